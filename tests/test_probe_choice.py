"""Choosing univfd's probe on training groups left out in turn (`streamguard.training.probe_choice`), on
features the tests make: which blocks it reads, what it falls back to, and that a probe fitted on a window
of blocks is served exactly by the head that reads them all."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from streamguard.builtin.cliphead.model import LinearProbe
from streamguard.evaluation.datasets import Sample
from streamguard.training.probe_choice import (
    GROUP_C_GRID,
    Candidate,
    Embedded,
    average_probes,
    candidates,
    choose_probe,
    columns,
    served_coefficients,
    source_directions,
    stack_draws,
    unit_length,
)

BLOCKS, WIDTH = 4, 8


def _unit_blocks(x: np.ndarray) -> np.ndarray:
    """(N, BLOCKS * WIDTH) with every block unit length, as `class_token_features` makes them."""
    b = x.reshape(len(x), BLOCKS, WIDTH)
    return (b / np.linalg.norm(b, axis=2, keepdims=True)).reshape(len(x), -1)


def _sample(i: int, group: str, label: int, split: str) -> Sample:
    return Sample(id=f"{split}/{group}/{i}", path="x", member=None, label=label,
                  generator=group if label else "real", family="diffusion" if label else "real",
                  source=f"set-{group}" if label else group, split=split)


def _shortcut_data(seed: int = 0) -> tuple[Embedded, Embedded]:
    """Groups that each hold one class (a generator's images are all fake, a source's all real). Blocks 2-3
    carry a weak sign of the class that every group shares; blocks 0-1 a strong mark of the group itself,
    which tells the class apart on the groups training has seen and says nothing about a new one."""
    rng = np.random.default_rng(seed)
    groups = [(f"real-{k}", 0) for k in range(5)] + [(f"gen-{k}", 1) for k in range(5)]
    marks = {g: rng.normal(0, 1, 2 * WIDTH) * 3 for g, _ in groups}
    sign = np.random.default_rng(123).normal(0, 1, 2 * WIDTH)  # the same in every data set
    splits = {}
    for split, n in (("train", 24), ("val", 8)):
        rows, samples = [], []
        for group, label in groups:
            for i in range(n):
                shortcut = marks[group] + rng.normal(0, 1, 2 * WIDTH)
                signal = (1 if label else -1) * 0.6 * sign + rng.normal(0, 1, 2 * WIDTH)
                rows.append(np.concatenate([shortcut, signal]))
                samples.append(_sample(i, group, label, split))
        x = _unit_blocks(np.asarray(rows))
        splits[split] = Embedded(x, np.arange(len(samples)), samples)
    return splits["train"], splits["val"]


def test_candidates_cover_every_c_on_each_window_of_the_blocks() -> None:
    twelve = candidates((30.0, 300.0), 12)
    assert twelve[0] == Candidate(30.0, (0, 12))  # the first of equals wins: all blocks, the smallest C
    assert sorted({c.blocks for c in twelve}) == [(0, 8), (0, 10), (0, 12), (2, 10), (4, 12), (6, 12)]
    assert len(twelve) == 12
    assert [c.blocks for c in candidates((1.0,), 0)] == [None]  # one embedding: no windows


def test_a_window_probe_is_served_exactly_by_the_head_that_reads_every_block() -> None:
    rng = np.random.default_rng(1)
    x = _unit_blocks(rng.normal(0, 1, (60, BLOCKS * WIDTH)))
    y = (x[:, WIDTH:2 * WIDTH].sum(axis=1) > 0).astype(int)
    cand = Candidate(10.0, (1, 3))
    model = LogisticRegression(C=cand.c, max_iter=2000).fit(columns(x, cand, BLOCKS), y)
    probe = LinearProbe(x.shape[1])
    with torch.no_grad():
        probe.linear.weight.copy_(torch.from_numpy(served_coefficients(model.coef_, cand, x, BLOCKS)).float())
        probe.linear.bias.copy_(torch.from_numpy(model.intercept_).float())
        served = probe(torch.from_numpy(x).float()).numpy()
    np.testing.assert_allclose(served, model.decision_function(columns(x, cand, BLOCKS)), atol=1e-4)
    assert not served_coefficients(model.coef_, cand, x, BLOCKS)[:, :WIDTH].any()  # block 0 is not read


def test_a_window_needs_unit_length_blocks() -> None:
    x = np.random.default_rng(2).normal(0, 1, (5, BLOCKS * WIDTH))
    with pytest.raises(ValueError, match="unit length"):
        served_coefficients(np.zeros((1, 2 * WIDTH)), Candidate(1.0, (0, 2)), x, BLOCKS)


def test_groups_left_out_choose_the_blocks_that_carry_over_to_new_groups() -> None:
    train, val = _shortcut_data()
    on_groups = choose_probe("groups", train, val, BLOCKS)
    assert on_groups.chosen_on.startswith("groups (")
    assert on_groups.candidate.blocks == (2, 4), on_groups.scores  # the shared sign, not the group marks
    assert on_groups.scores[on_groups.candidate.label] > on_groups.scores[f"C={on_groups.candidate.c:g} blocks 1-4"]
    # The val split holds the same groups as train: there the group marks look as good as anything.
    on_val = choose_probe("val", train, val, BLOCKS)
    assert on_val.chosen_on == "val" and on_val.candidate.blocks is None
    # And on groups neither saw (new marks, the same shared sign), the probe chosen on groups separates the
    # classes better.
    new, _ = _shortcut_data(seed=7)

    def auc(choice: object) -> float:
        from sklearn.metrics import roc_auc_score

        cand = choice.candidate  # type: ignore[attr-defined]
        logits = choice.model.decision_function(columns(new.x, cand, BLOCKS))  # type: ignore[attr-defined]
        return float(roc_auc_score(new.y, logits))

    assert auc(on_groups) > auc(on_val)


def _fit(cand: Candidate, x: np.ndarray, y: np.ndarray) -> LogisticRegression:
    return LogisticRegression(C=cand.c, max_iter=2000, class_weight="balanced").fit(x, y)


def test_the_averaged_probe_is_served_exactly_by_one_head() -> None:
    train, val = _shortcut_data()
    choice = choose_probe("average", train, val, BLOCKS)
    assert choice.candidate is None and choice.chosen_on == f"average ({len(candidates(GROUP_C_GRID, BLOCKS))} probes)"
    probe = LinearProbe(train.x.shape[1])
    with torch.no_grad():
        probe.linear.weight.copy_(torch.from_numpy(choice.model.coef_).float())  # type: ignore[attr-defined]
        probe.linear.bias.copy_(torch.from_numpy(choice.model.intercept_).float())  # type: ignore[attr-defined]
        served = probe(torch.from_numpy(val.x).float()).numpy()
    np.testing.assert_allclose(served, choice.model.decision_function(val.x), atol=1e-4)  # type: ignore[attr-defined]
    # It is the candidates' mean: every window's probe reads some block, so no block is left unread.
    coef = choice.model.coef_  # type: ignore[attr-defined]
    assert all(coef[0, b * WIDTH:(b + 1) * WIDTH].any() for b in range(BLOCKS))


def test_each_averaged_probe_weighs_the_same_whatever_its_logits_spread() -> None:
    train, _ = _shortcut_data()
    cands = candidates((1.0, 100.0), BLOCKS)

    def louder(cand: Candidate, x: np.ndarray, y: np.ndarray) -> LogisticRegression:
        model = _fit(cand, x, y)
        if cand == cands[-1]:  # one candidate's logits ten times wider: the same ranking, a louder voice
            model.coef_, model.intercept_ = model.coef_ * 10, model.intercept_ * 10
        return model

    def features(x: np.ndarray, cand: Candidate) -> np.ndarray:
        return columns(x, cand, BLOCKS)

    plain = average_probes(train, cands, features, _fit, BLOCKS, normalise=True)
    loud = average_probes(train, cands, features, louder, BLOCKS, normalise=True)
    np.testing.assert_allclose(loud.coef_, plain.coef_, rtol=1e-9)
    np.testing.assert_allclose(loud.intercept_, plain.intercept_, rtol=1e-9)


def _sources_along(seed: int, reals: dict[str, float], fakes: dict[str, float], n: int = 30) -> Embedded:
    """Real sources and generators placed along one axis, ``axis``, that says where an image comes from (its
    offset the dict's value), and a weak sign of the class, ``sign``, that every group shares."""
    rng = np.random.default_rng(seed)
    axis, sign = (np.tile(np.eye(WIDTH)[k], BLOCKS) for k in (0, 1))  # in every block
    rows, samples = [], []
    for label, groups in ((0, reals), (1, fakes)):
        for group, offset in groups.items():
            for i in range(n):
                rows.append(offset * axis + (0.4 if label else -0.4) * sign + rng.normal(0, 0.5, BLOCKS * WIDTH))
                samples.append(_sample(i, group, label, "train"))
    return Embedded(_unit_blocks(np.asarray(rows)), np.arange(len(samples)), samples)


def test_without_the_real_sources_directions_an_unseen_source_is_not_judged_by_where_it_sits() -> None:
    # The seen generators sit further along the source axis than the seen real sources on average: a probe
    # that reads the axis learns "further along is generated", and a real source further along than any
    # seen one is then called generated.
    train = _sources_along(0, {"phone": -2.0, "camera": 0.0, "scans": 1.0}, {"gen-a": 1.5, "gen-b": 2.5})
    unseen = _sources_along(1, {"press": 3.0}, {"gen-c": 1.0})
    cands = candidates((1.0, 100.0), BLOCKS)

    def features(x: np.ndarray, cand: Candidate) -> np.ndarray:
        return columns(x, cand, BLOCKS)

    def auc(probe: object) -> float:
        from sklearn.metrics import roc_auc_score

        return float(roc_auc_score(unseen.y, probe.decision_function(unseen.x)))  # type: ignore[attr-defined]

    plain = average_probes(train, cands, features, _fit, BLOCKS, normalise=True)
    blind = average_probes(train, cands, features, _fit, BLOCKS, normalise=True, without_sources=True)
    assert auc(plain) < 0.75 and auc(blind) > 0.9, (auc(plain), auc(blind))


def test_the_probe_without_the_sources_directions_gives_them_no_weight() -> None:
    train = _sources_along(0, {"phone": -2.0, "camera": 0.0, "scans": 1.0}, {"gen-a": 1.5, "gen-b": 2.5})
    x = unit_length(train.x)
    groups = [s.group for s in train.samples]
    basis = source_directions(x, train.y, groups)
    assert basis.shape == (x.shape[1], 2)  # three sources' means differ in a plane; the generators' are not asked
    np.testing.assert_allclose(basis.T @ basis, np.eye(2), atol=1e-9)
    cands = candidates((1.0, 100.0), 0)  # one window, every column: the basis is in the served head's own space
    blind = average_probes(train, cands, lambda x, _: unit_length(x), _fit, 0, normalise=True, without_sources=True)
    plain = average_probes(train, cands, lambda x, _: unit_length(x), _fit, 0, normalise=True)
    np.testing.assert_allclose(blind.coef_ @ basis, 0.0, atol=1e-9)
    assert np.abs(plain.coef_ @ basis).max() > 0.1
    # On the head's input, two real sources' mean rows get the same logit.
    means = [x[[g == name for g in groups]].mean(axis=0) for name in ("phone", "scans")]
    assert blind.coef_[0] @ means[0] == pytest.approx(blind.coef_[0] @ means[1], abs=1e-9)
    assert abs(plain.coef_[0] @ (means[0] - means[1])) > 0.1
    with pytest.raises(ValueError, match="averaged"):
        choose_probe("groups", train, train, BLOCKS, without_sources=True)


def test_the_procedural_screenshots_are_no_source_to_be_blind_to() -> None:
    from dataclasses import replace

    from streamguard.training.renders import SOURCE

    # Two photo sources and, far along another axis, the renders: only the photos' difference is removed.
    train = _sources_along(0, {"phone": -1.0, "camera": 1.0}, {"gen-a": 0.0})
    screens = _sources_along(1, {"screens": 0.0}, {})
    screens = Embedded(_unit_blocks(screens.x + 3 * np.tile(np.eye(WIDTH)[2], BLOCKS)), screens.owner,
                       [replace(s, source=SOURCE) for s in screens.samples])
    both = train.joined(screens)
    cands = candidates((1.0,), 0)
    blind = average_probes(both, cands, lambda x, _: unit_length(x), _fit, 0, normalise=True, without_sources=True)
    x, groups = unit_length(both.x), [s.group for s in both.samples]
    photos = [x[[g == name for g in groups]].mean(axis=0) for name in ("phone", "camera")]
    assert blind.coef_[0] @ photos[0] == pytest.approx(blind.coef_[0] @ photos[1], abs=1e-9)
    rendered = x[[g == SOURCE for g in groups]].mean(axis=0)
    assert abs(blind.coef_[0] @ (rendered - photos[0])) > 0.1  # the renders' own direction is kept


def test_groups_that_cannot_be_left_out_fall_back_to_the_val_split() -> None:
    train, val = _shortcut_data()
    other = {s.id for s in train.samples + val.samples if s.group not in ("real-0", "gen-0")}
    # Two groups, one of each class: leaving either out leaves one class to fit on, so nothing is ranked.
    choice = choose_probe("groups", train.without(other), val.without(other), BLOCKS)
    assert choice.chosen_on == "val" and choice.candidate.blocks is None
    assert set(choice.scores) == {f"C={c:g}" for c in (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)}


def test_left_out_groups_are_scored_on_the_originals_given() -> None:
    train, val = _shortcut_data()
    both = Embedded(np.concatenate([train.x, val.x]), np.concatenate([train.owner, val.owner + len(train.samples)]),
                    train.samples + val.samples)
    # The same rows as originals rank exactly as train's and val's own rows do...
    assert choose_probe("groups", train, val, BLOCKS, originals=both).scores == choose_probe(
        "groups", train, val, BLOCKS).scores
    # ...and other bytes of the same images rank differently: the scores are the originals'.
    shifted = Embedded(_unit_blocks(both.x + np.random.default_rng(3).normal(0, 0.5, both.x.shape)), both.owner,
                       both.samples)
    assert choose_probe("groups", train, val, BLOCKS, originals=shifted).scores != choose_probe(
        "groups", train, val, BLOCKS).scores


def test_draws_stack_as_views_of_the_same_images_and_drop_an_image_any_draw_skipped() -> None:
    samples = [_sample(i, "g", i % 2, "train") for i in range(3)]
    first = Embedded(np.arange(3, dtype=np.float32)[:, None], np.arange(3), samples)
    # The second draw skipped image 1 (a decode error under its augmentation) and lists the rest reordered.
    second = Embedded(np.array([[12.0], [10.0]], np.float32), np.array([0, 1]), [samples[2], samples[0]])
    stacked = stack_draws([first, second])
    assert [s.id for s in stacked.samples] == [samples[0].id, samples[2].id]
    rows = {(int(o), float(v)) for o, v in zip(stacked.owner, stacked.x[:, 0])}
    assert rows == {(0, 0.0), (1, 2.0), (0, 10.0), (1, 12.0)}
    np.testing.assert_array_equal(stacked.row_y, [0, 0, 0, 0])  # images 0 and 2 are both label 0
    np.testing.assert_allclose(stacked.per_image(stacked.x[:, 0]), [5.0, 7.0])  # each image: its draws' mean

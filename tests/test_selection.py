"""Choosing fusion weights and thresholds on validation scores (`streamguard.evaluation.selection`)."""

from __future__ import annotations

import numpy as np
import pytest

from streamguard.config import FusionSettings
from streamguard.evaluation.selection import (
    Interval,
    Scored,
    auc_by_group,
    balanced_auc,
    bootstrap_auc,
    bootstrap_policy,
    carried_over_auc,
    choose_thresholds,
    choose_weights,
    fuse,
    operating_point,
    operating_points,
    policy_carry_over,
    simplex,
    verdict_rates,
)
from streamguard.fusion import fuse_scores
from streamguard.schemas import DetectorScore


def test_balanced_auc_weighs_each_group_the_same() -> None:
    # A big real source ranked perfectly and a small one ranked entirely wrong: pooled AUC hides the small
    # one's failure, the balanced one gives it half the say.
    labels = np.array([0] * 90 + [0] * 10 + [1] * 100)
    groups = ["big"] * 90 + ["small"] * 10 + ["gen"] * 100
    scores = np.array([0.1] * 90 + [0.9] * 10 + [0.5] * 100)
    assert balanced_auc(labels, groups, scores) == pytest.approx(0.5)
    assert balanced_auc(labels[:90], groups[:90], scores[:90]) is None


def test_auc_by_group_names_the_groups_the_balanced_auc_loses_and_adds_up_to_it() -> None:
    rng = np.random.default_rng(3)
    # Two real sources and three generators of unequal sizes; "hard" real photos overlap "gan"'s scores.
    spec = [("phones", 0, 40, -2.0), ("hard", 0, 7, 0.5), ("sd", 1, 30, 2.0), ("gan", 1, 12, 0.3), ("dalle", 1, 5, 3.0)]
    labels = np.concatenate([np.full(n, label) for _, label, n, _ in spec])
    groups = [g for g, _, n, _ in spec for _ in range(n)]
    scores = np.concatenate([rng.normal(mu, 1.0, n) for _, _, n, mu in spec])
    by_group = auc_by_group(labels, groups, scores)
    assert set(by_group) == {"phones", "hard", "sd", "gan", "dalle"}
    # Checked against the definition: one pair's AUC is the share of its (fake, real) orderings that are right.
    def pair(real: str, fake: str) -> float:
        r = scores[[g == real for g in groups]]
        f = scores[[g == fake for g in groups]]
        return float(np.mean((f[:, None] > r[None, :]) + 0.5 * (f[:, None] == r[None, :])))
    assert by_group["hard"] == pytest.approx(np.mean([pair("hard", f) for f in ("sd", "gan", "dalle")]))
    assert by_group["gan"] == pytest.approx(np.mean([pair(r, "gan") for r in ("phones", "hard")]))
    # Each kind's groups average to the balanced AUC, so their costs add up to the whole shortfall.
    whole = balanced_auc(labels, groups, scores)
    assert np.mean([by_group["phones"], by_group["hard"]]) == pytest.approx(whole)
    assert np.mean([by_group[g] for g in ("sd", "gan", "dalle")]) == pytest.approx(whole)
    assert min(by_group, key=by_group.get) in {"hard", "gan"}
    assert auc_by_group(labels[:47], groups[:47], scores[:47]) == {}


def test_bootstrap_intervals_hold_the_estimate_and_pairing_tells_a_real_gain_from_noise() -> None:
    rng = np.random.default_rng(3)
    labels = np.array([0] * 60 + [0] * 20 + [1] * 40 + [1] * 40)
    groups = ["phone"] * 60 + ["portraits"] * 20 + ["gan"] * 40 + ["dit"] * 40
    signal = labels * 1.0 + rng.normal(0, 0.8, len(labels))
    shared_noise = rng.normal(0, 0.5, len(labels))
    logits = {"strong": signal + shared_noise, "weak": 0.3 * signal + shared_noise + rng.normal(0, 0.8, len(labels)),
              "copy": signal + shared_noise}
    out = bootstrap_auc(Scored(labels, tuple(groups), logits), draws=300, seed=1)
    assert set(out) == {"strong", "weak", "copy", "strong - weak", "strong - copy", "weak - copy"}
    for key, iv in out.items():
        assert iv.low <= iv.value <= iv.high, key
    assert out["strong"].value == pytest.approx(balanced_auc(labels, groups, logits["strong"]), abs=1e-4)
    assert out["strong - weak"].low > 0  # a real gain: the interval stays above zero
    assert out["strong - copy"] == Interval(0.0, 0.0, 0.0)  # the same scores: no difference in any draw
    assert out["strong - weak"].high - out["strong - weak"].low < out["strong"].high - out["weak"].low
    assert out == bootstrap_auc(Scored(labels, tuple(groups), logits), draws=300, seed=1)  # seeded


def test_fuse_is_the_fusion_hooks_weighted_logit_mean() -> None:
    logits = {"a": np.array([2.0, -1.0]), "b": np.array([0.5, 3.0])}
    weights = {"a": 0.7, "b": 0.3}
    ours = fuse(logits, weights)
    for i in range(2):
        scores = [DetectorScore(detector=name, version="1", probability=0.5, logit=float(z[i]), latency_ms=1.0)
                  for name, z in logits.items()]
        hook = fuse_scores(scores, FusionSettings(weights=weights, scale=1.0, bias=0.0))
        assert hook.logit == pytest.approx(ours[i])
        # The shipped fusion recalibrates that mean as a whole, as validation fitted it.
        shipped = FusionSettings(weights=weights)
        assert fuse_scores(scores, shipped).logit == pytest.approx(shipped.scale * ours[i] + shipped.bias)
    with pytest.raises(ValueError, match="positive weight"):
        fuse(logits, {"a": 0.0})


def test_simplex_grid_sums_to_one() -> None:
    grid = simplex(["a", "b", "c"], 0.5)
    assert len(grid) == 6 and all(sum(w.values()) == pytest.approx(1.0) for w in grid)


def test_choose_weights_favours_the_detector_that_separates_and_reports_equal_weights() -> None:
    rng = np.random.default_rng(0)
    labels = np.array([0] * 50 + [1] * 50)
    groups = ["r"] * 50 + ["g"] * 50
    good = np.where(labels == 1, 2.0, -2.0) + rng.normal(0, 1.0, 100)
    noise = rng.normal(0, 3.0, 100)
    choice = choose_weights(Scored(labels, tuple(groups), {"good": good, "noise": noise}), step=0.1)
    assert choice.weights["good"] > choice.weights["noise"]
    assert choice.auc >= choice.equal_auc
    assert choice.auc == pytest.approx(balanced_auc(labels, groups, fuse({"good": good, "noise": noise},
                                                                         choice.weights)))


def test_choose_weights_prefers_equal_weights_among_ties() -> None:
    labels = np.array([0, 0, 1, 1])
    same = np.array([-1.0, -2.0, 1.0, 2.0])
    choice = choose_weights(Scored(labels, ("r", "r", "g", "g"), {"a": same, "b": same.copy()}), step=0.25)
    assert choice.weights == {"a": 0.5, "b": 0.5}


def test_thresholds_bound_the_worst_real_source_and_the_mean_generator() -> None:
    # Source "hard" has its photos spread up to 0.9; the ai threshold must clear all but 5% of them.
    hard = np.linspace(0.0, 0.9, 100)
    easy = np.full(100, 0.05)
    gen_a = np.linspace(0.3, 1.0, 100)
    gen_b = np.full(100, 0.95)
    probs = np.concatenate([hard, easy, gen_a, gen_b])
    labels = np.array([0] * 200 + [1] * 200)
    groups = ["hard"] * 100 + ["easy"] * 100 + ["a"] * 100 + ["b"] * 100
    choice = choose_thresholds(labels, groups, probs, max_false_flag=0.05, max_false_clear=0.10)
    assert choice.ai_target_met and choice.real_target_met
    assert np.mean(hard >= choice.ai_threshold) <= 0.05
    assert np.mean(hard >= choice.ai_threshold - 0.01) > 0.05  # the lowest threshold that meets the target
    def mean_clear(t: float) -> float:
        return float(np.mean(gen_a <= t) + np.mean(gen_b <= t)) / 2

    assert mean_clear(choice.real_threshold) <= 0.10 < mean_clear(choice.real_threshold + 0.01)  # the highest
    assert choice.real_threshold < choice.ai_threshold
    rates = verdict_rates(labels, groups, probs, choice.ai_threshold, choice.real_threshold)
    assert rates["hard"]["ai_generated"] == pytest.approx(choice.worst_false_flag, abs=1e-4)
    for row in rates.values():
        assert row["ai_generated"] + row["uncertain"] + row["real"] == pytest.approx(1.0)
    assert rates["easy"]["real"] == 1.0 and rates["b"]["ai_generated"] == 1.0


def test_operating_points_price_each_missed_aim_in_what_the_thresholds_give_up() -> None:
    # A ranking that cannot meet the 2% rule and flag 75% of generators together: the hard real source's top
    # photos sit among the generators' middle, which the chosen policy leaves uncertain.
    hard, easy = np.concatenate([np.linspace(0.0, 0.35, 95), np.linspace(0.6, 0.97, 6)]), np.full(101, 0.05)
    gen_a = np.concatenate([np.linspace(0.3, 0.48, 20), np.linspace(0.55, 0.85, 40), np.linspace(0.9, 1.0, 41)])
    gen_b = gen_a * 0.99
    probs = np.concatenate([hard, easy, gen_a, gen_b])
    labels = np.array([0] * 202 + [1] * 202)
    groups = ["hard"] * 101 + ["easy"] * 101 + ["a"] * 101 + ["b"] * 101
    chosen = choose_thresholds(labels, groups, probs, max_false_flag=0.02, max_false_clear=0.10)
    points = operating_points(labels, groups, probs, chosen, max_false_flag=0.02)

    def flagged(t: float) -> float:
        return float(np.mean(gen_a >= t) + np.mean(gen_b >= t)) / 2

    def uncertain(ai: float, real: float) -> float:
        return float(np.mean((probs > real) & (probs < ai)))

    here = points["chosen"]
    assert (here.ai_threshold, here.real_threshold) == (chosen.ai_threshold, chosen.real_threshold)
    assert here.worst_false_flag == pytest.approx(chosen.worst_false_flag, abs=1e-4)
    assert here.real_sources_over == 0 and here.generators_flagged < 0.75 and here.uncertain > 0.20
    flag = points["flagged_aim"]
    assert flag.generators_flagged == pytest.approx(flagged(flag.ai_threshold), abs=1e-4)
    assert flag.generators_flagged >= 0.75
    assert flagged(flag.ai_threshold + 0.01) < 0.75  # the highest that meets it: the least given up
    assert flag.worst_false_flag == pytest.approx(np.mean(hard >= flag.ai_threshold), abs=1e-4)
    assert flag.real_sources_over == 1 and flag.real_flagged == pytest.approx(flag.worst_false_flag / 2, abs=1e-4)
    assert flag.real_threshold < flag.ai_threshold
    calm = points["uncertain_aim"]
    assert calm.ai_threshold == chosen.ai_threshold
    assert calm.uncertain == pytest.approx(uncertain(calm.ai_threshold, calm.real_threshold), abs=1e-4)
    assert calm.uncertain <= 0.20
    assert uncertain(calm.ai_threshold, calm.real_threshold - 0.01) > 0.20  # the lowest: the least cleared
    assert calm.generators_cleared == pytest.approx(
        (np.mean(gen_a <= calm.real_threshold) + np.mean(gen_b <= calm.real_threshold)) / 2, abs=1e-4)
    assert calm.generators_cleared > here.generators_cleared  # what it costs: generated images cleared


def test_operating_points_keep_a_met_aim_where_it_is_and_stop_at_even_odds() -> None:
    labels = np.array([0] * 50 + [1] * 50)
    groups = ["photos"] * 50 + ["gan"] * 50
    separated = np.concatenate([np.full(50, 0.1), np.full(50, 0.9)])
    chosen = choose_thresholds(labels, groups, separated, max_false_flag=0.02)
    points = operating_points(labels, groups, separated, chosen, max_false_flag=0.02)
    assert points["flagged_aim"] == points["uncertain_aim"] == points["chosen"]
    # Generators at 0.4 and real photos at 0.6 (a ranking upside down): meeting either aim would take a verdict
    # against the odds, so each point stops at 0.5, where the aim stays missed.
    upside_down = np.concatenate([np.full(50, 0.6), np.full(50, 0.4)])
    chosen = choose_thresholds(labels, groups, upside_down, max_false_flag=0.02)
    points = operating_points(labels, groups, upside_down, chosen, max_false_flag=0.02)
    flag, calm = points["flagged_aim"], points["uncertain_aim"]
    assert flag.ai_threshold == 0.5 and flag.generators_flagged == 0.0 and flag.real_threshold < 0.5
    assert calm.real_threshold == 0.5 and calm.uncertain == 0.5  # the real photos between 0.5 and the flag


def test_thresholds_hold_on_every_copy_the_stream_may_carry() -> None:
    """Copies (rows: original bytes, then e.g. a downscale) each meet both targets: the worst real source of
    any copy bounds ``ai_threshold``, the copy that clears most generated images bounds ``real_threshold``."""
    photos = np.linspace(0.0, 0.9, 60)
    gen_a, gen_b = np.linspace(0.2, 1.0, 50), np.linspace(0.4, 1.0, 50)
    original = np.concatenate([photos, gen_a, gen_b])
    labels = np.array([0] * 60 + [1] * 100)
    groups = ["photos"] * 60 + ["a"] * 50 + ["b"] * 50
    # The downscale lifts two real photos to 0.96 and clears less of a generator (its scores rise by 0.05).
    downscaled = original.copy()
    downscaled[:2] = 0.96
    downscaled[60:] = np.minimum(original[60:] + 0.05, 1.0)
    alone = choose_thresholds(labels, groups, original, 0.02, 0.10)
    assert choose_thresholds(labels, groups, original[None], 0.02, 0.10) == alone  # one copy: the same choice
    both = choose_thresholds(labels, groups, np.stack([original, downscaled]), 0.02, 0.10)
    flagged_down = np.mean(downscaled[:60] >= alone.ai_threshold)
    assert alone.ai_threshold == 0.89 and flagged_down > 0.02  # the original bytes' policy breaks after a downscale
    assert both.ai_threshold == 0.97 and both.ai_target_met
    assert both.worst_false_flag == pytest.approx(max(np.mean(downscaled[:60] >= 0.97), np.mean(photos >= 0.97)))
    # The original bytes clear more generated images than the downscale does: they bound real_threshold.
    assert both.real_threshold == alone.real_threshold
    clear_down = np.mean([np.mean(downscaled[rows] <= both.real_threshold) for rows in (np.r_[60:110], np.r_[110:160])])
    assert both.mean_false_clear == alone.mean_false_clear > clear_down
    # With the copies the other way round the downscale clears more, and real_threshold falls to hold on it.
    lowered = np.concatenate([original[:60], np.maximum(original[60:] - 0.1, 0.0)])
    stricter = choose_thresholds(labels, groups, np.stack([original, lowered]), 0.02, 0.10)
    assert stricter.real_threshold < alone.real_threshold
    assert stricter.real_threshold == choose_thresholds(labels, groups, lowered, 0.02, 0.10).real_threshold


def test_carry_over_judges_a_left_out_group_on_every_copy() -> None:
    """With copies, each group's thresholds are chosen on the others' copies too, and its share flagged is
    given on each copy: a real source flagged only once downscaled shows there, not on its original bytes."""
    photos, portraits = np.linspace(0.0, 0.6, 50), np.full(10, 0.2)
    gens = np.linspace(0.5, 1.0, 50)
    original = np.concatenate([photos, portraits, gens])
    downscaled = original.copy()
    downscaled[55] = 0.97  # one portrait, downscaled
    labels = np.array([0] * 60 + [1] * 50)
    groups = ["photos"] * 50 + ["portraits"] * 10 + ["a"] * 50
    copies = np.stack([original, downscaled])
    carried = {c.group: c for c in policy_carry_over(labels, groups, copies, 0.02, 0.10)}
    portrait = carried["portraits"]
    assert portrait.ai_generated == 0.0 and portrait.copies_ai_generated == (0.1,)
    assert portrait.ai_threshold == choose_thresholds(labels[np.r_[0:50, 60:110]], ["photos"] * 50 + ["a"] * 50,
                                                      copies[:, np.r_[0:50, 60:110]], 0.02, 0.10).ai_threshold
    # With the portraits in the choice their downscale holds ai_threshold over 0.97: the photos meet it.
    assert carried["photos"].ai_threshold > 0.97 and carried["photos"].copies_ai_generated == (0.0,)
    # Without copies the field is empty, and a refit's stacked answer is read the same way as the pool's.
    assert policy_carry_over(labels, groups, original, 0.02, 0.10)[0].copies_ai_generated == ()
    refitted = policy_carry_over(labels, groups, original, 0.02, 0.10, refit=lambda rest: copies)
    assert {c.group: c for c in refitted} == carried


def test_carry_over_judges_each_group_under_thresholds_chosen_without_it() -> None:
    # "outlier" has one photo at 0.97: with it in the pool the ai threshold sits over it, without it the
    # other real source ("tame", nothing over 0.6) lets the threshold fall, and the outlier is flagged.
    tame = np.linspace(0.0, 0.6, 50)
    outlier = np.concatenate([np.full(9, 0.1), [0.97]])
    gen_a = np.linspace(0.5, 1.0, 50)
    gen_b = np.full(20, 0.99)
    probs = np.concatenate([tame, outlier, gen_a, gen_b])
    labels = np.array([0] * 60 + [1] * 70)
    groups = ["tame"] * 50 + ["outlier"] * 10 + ["a"] * 50 + ["b"] * 20
    pooled = choose_thresholds(labels, groups, probs, max_false_flag=0.02, max_false_clear=0.10)
    assert pooled.ai_threshold > 0.97  # the outlier's own rule held it up
    carried = {c.group: c for c in policy_carry_over(labels, groups, probs, 0.02, 0.10)}
    assert set(carried) == {"tame", "outlier", "a", "b"}
    assert carried["outlier"].kind == "real" and carried["outlier"].ai_threshold <= 0.61
    assert carried["outlier"].ai_generated == pytest.approx(0.1)  # over the 2% the pooled choice promised
    assert carried["tame"].ai_threshold == pooled.ai_threshold and carried["tame"].ai_generated == 0.0
    without_b = choose_thresholds(labels[:110], groups[:110], probs[:110], 0.02, 0.10)
    assert carried["b"].kind == "ai" and carried["b"].real_threshold == without_b.real_threshold
    assert carried["b"].ai_generated == pytest.approx(np.mean(gen_b >= without_b.ai_threshold))
    only_real = policy_carry_over(labels[50:], groups[50:], probs[50:], 0.02, 0.10)
    assert {c.group for c in only_real} == {"a", "b"}  # without "outlier" no real source is left to choose on
    with pytest.raises(ValueError, match="both real and generated"):
        policy_carry_over(labels, ["tame"] * 50 + ["mixed"] * 60 + ["b"] * 20, probs)


def test_carry_over_refits_what_else_was_chosen_without_the_group() -> None:
    """With ``refit`` a left-out group's images are judged under probabilities chosen on the others: here a
    calibration that, fitted without the outlier, moves every score, so the thresholds move with it."""
    probs = np.concatenate([np.linspace(0.0, 0.6, 50), np.full(9, 0.1), [0.97], np.linspace(0.5, 1.0, 50)])
    labels = np.array([0] * 60 + [1] * 50)
    groups = ["tame"] * 50 + ["outlier"] * 10 + ["a"] * 50
    seen: list[frozenset[str]] = []

    def refit(rest: np.ndarray) -> np.ndarray:
        seen.append(frozenset(np.asarray(groups)[rest].tolist()))
        return probs ** 2 if not rest[55] else probs  # a different fit only when the outlier had no say

    carried = {c.group: c for c in policy_carry_over(labels, groups, probs, 0.02, 0.10, refit=refit)}
    # Asked once per group left out, on the others ("a", the only generator, is never left out).
    assert seen == [frozenset({"tame", "a"}), frozenset({"outlier", "a"})]
    rest = np.asarray(groups) != "outlier"
    squared = choose_thresholds(labels[rest], list(np.asarray(groups)[rest]), probs[rest] ** 2, 0.02, 0.10)
    assert carried["outlier"].ai_threshold == squared.ai_threshold
    assert carried["outlier"].ai_generated == pytest.approx(np.mean(probs[50:60] ** 2 >= squared.ai_threshold))
    plain = {c.group: c for c in policy_carry_over(labels, groups, probs, 0.02, 0.10)}
    assert carried["tame"] == plain["tame"] and carried["outlier"] != plain["outlier"]


def test_carried_over_auc_ranks_each_pair_under_what_was_chosen_without_both() -> None:
    """Each (real source, generator) pair is ranked under ``refit`` on the other groups' mask; a refit that
    ignores the mask gives back the pooled balanced AUC (the mean of the pairs' AUCs)."""
    rng = np.random.default_rng(5)
    labels = np.repeat([0, 0, 1, 1, 1], 25)
    groups = tuple(np.repeat(["r1", "r2", "g1", "g2", "g3"], 25).tolist())
    probs = np.clip(0.35 + 0.3 * labels + rng.normal(0, 0.15, 125), 0.01, 0.99)
    pooled = balanced_auc(labels, groups, probs)
    assert carried_over_auc(labels, groups, lambda rest: probs) == pytest.approx(pooled)
    seen: list[frozenset[str]] = []
    # What a choice without r1 does: it ranks g1 as real as can be. The pair (r1, g1) pays; no other pair.
    g1 = np.asarray(groups) == "g1"

    def refit(rest: np.ndarray) -> np.ndarray:
        seen.append(frozenset(np.asarray(groups)[rest].tolist()))
        return probs if rest[0] else np.where(g1, 0.0, probs)
    carried = carried_over_auc(labels, groups, refit)
    pairs = [frozenset({r, g}) for r in ("r1", "r2") for g in ("g1", "g2", "g3")]
    assert sorted(map(sorted, seen)) == sorted(sorted({"r1", "r2", "g1", "g2", "g3"} - pair) for pair in pairs)
    r1_g1 = np.r_[0:25, 50:75]
    before = balanced_auc(labels[r1_g1], [groups[k] for k in r1_g1], probs[r1_g1])
    assert before is not None and before > 0.5
    assert carried == pytest.approx(pooled - before / 6)  # that pair's AUC fell to 0: one sixth of the mean
    # One generator group: leaving it out leaves nothing to choose on.
    one = tuple("g" if g.startswith("g") else g for g in groups)
    assert carried_over_auc(labels, one, lambda rest: probs) is None


def test_an_unmeetable_target_takes_the_strictest_threshold_and_says_so() -> None:
    labels = np.array([0, 0, 1, 1])
    probs = np.array([0.999, 0.1, 0.002, 0.9])
    choice = choose_thresholds(labels, ["r", "r", "g", "g"], probs, max_false_flag=0.0, max_false_clear=0.0)
    assert not choice.ai_target_met and choice.ai_threshold == 0.999  # the grid's finest top value
    assert not choice.real_target_met and choice.real_threshold == 0.01


def test_scored_checks_lengths() -> None:
    with pytest.raises(ValueError, match="one entry per image"):
        Scored(np.array([0, 1]), ("r", "g"), {"a": np.array([0.0])})


def test_fused_calibration_recentres_scores_that_unseen_sources_shift() -> None:
    from streamguard.evaluation.selection import fit_fused_calibration

    rng = np.random.default_rng(0)
    # Held-out logits all shifted up by 3 (unseen real photos look "fake" to a seen-source calibration),
    # and twice as many images in one real group as in the other: groups and classes weigh equally.
    real = np.concatenate([rng.normal(3 - 2, 1, 400), rng.normal(3 - 2, 1, 200)])
    fake = rng.normal(3 + 2, 1, 300)
    logits = np.concatenate([real, fake])
    labels = np.array([0] * 600 + [1] * 300)
    groups = ["a"] * 400 + ["b"] * 200 + ["g"] * 300
    cal = fit_fused_calibration(labels, groups, logits)
    p = 1 / (1 + np.exp(-(cal.scale * logits + cal.bias)))
    assert cal.scale > 0
    # Even odds now sit between the classes (logit 3), not at raw 0 where every image was "fake".
    assert -cal.bias / cal.scale == pytest.approx(3.0, abs=0.3)
    assert np.mean(p[:600] < 0.5) > 0.9 and np.mean(p[600:] > 0.5) > 0.9


def _policy_pool(seed: int = 5) -> tuple[np.ndarray, list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    spec = [("big", 0, 200, -2.0), ("small", 0, 10, -1.5), ("sd", 1, 60, 1.5), ("gan", 1, 30, 0.5), ("dit", 1, 40, 2.0)]
    labels = np.concatenate([[y] * n for _, y, n, _ in spec])
    groups = [g for g, _, n, _ in spec for _ in range(n)]
    logits = np.concatenate([rng.normal(mu, 1.2, n) for _, _, n, mu in spec])
    return labels, groups, logits


def test_the_policy_bootstrap_prices_what_a_tail_decides() -> None:
    labels, groups, z = _policy_pool()
    other = 1 / (1 + np.exp(-z))
    # The same verdict but for the big source's six most generated-looking photos, lowered: it ranks almost
    # as before, and the lowest ai_threshold that keeps every real source within 2% falls.
    big = np.flatnonzero(np.asarray(groups) == "big")
    top = big[np.argsort(z[big])[-6:]]
    lowered = z.copy()
    lowered[top] -= 3.0
    this = 1 / (1 + np.exp(-lowered))
    out = bootstrap_policy(labels, groups, {"this": this, "other": other}, 0.02, 0.10, draws=200, seed=2)
    for name, probs in (("this", this), ("other", other)):
        chosen = choose_thresholds(labels, groups, probs, 0.02, 0.10)
        point = operating_point(labels, groups, probs, chosen.ai_threshold, chosen.real_threshold, 0.02)
        assert out[f"{name} generators_flagged"].value == point.generators_flagged
        assert out[f"{name} uncertain"].value == point.uncertain
    flagged = out["this - other generators_flagged"]
    assert flagged.value > 0.05 and flagged.low < flagged.value  # more flagged here, less on some resamples
    assert out == bootstrap_policy(labels, groups, {"this": this, "other": other}, 0.02, 0.10, draws=200, seed=2)
    # One verdict against itself: no difference on any resample.
    same = bootstrap_policy(labels, groups, {"this": other, "other": other}, 0.02, 0.10, draws=50)
    assert all(same[f"this - other {m}"] == Interval(0.0, 0.0, 0.0) for m in ("generators_flagged", "uncertain",
                                                                               "real_cleared"))
    with pytest.raises(ValueError, match="two verdicts"):
        bootstrap_policy(labels, groups, {"this": this}, 0.02, 0.10)

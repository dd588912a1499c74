"""Choosing fusion weights and policy thresholds from validation scores, and reporting them per group.

Every number here weighs groups (a real-photo source, a generator) equally, not images: on unseen data
the question is how the worst and the typical source fare, and the shared data's groups differ in size by
7x. The fused score is the default fusion hook's (`streamguard.fusion`): the weighted mean of calibrated
logits.

Thresholds follow the costs a platform has:
- ``ai_threshold`` is the lowest at which no real source has more than ``max_false_flag`` of its photos
  called AI-generated. Flagging a real photo is the costly error, so the worst source bounds it.
- ``real_threshold`` is the highest at which generators, on average, have at most ``max_false_clear`` of
  their images cleared as real. Missing part of one unseen generator is expected; clearing many across
  generators is not. Between the two the verdict is ``uncertain`` (human review).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from streamguard.evaluation.metrics import ranked_auc

# A finer tail at the top: with "no real source over 2% flagged" and sources of a few dozen photos, the
# lowest threshold that holds can sit above 0.99, and the grid would otherwise say no threshold does.
THRESHOLD_GRID = np.concatenate([np.round(np.arange(0.01, 1.0, 0.01), 2), [0.995, 0.998, 0.999]])


@dataclass(frozen=True)
class Scored:
    """Validation images with one calibrated logit per detector (``logits[name][i]``)."""

    labels: np.ndarray  # (N,) 0 real, 1 fake
    groups: tuple[str, ...]  # the source of a real image, the generator of a fake one
    logits: Mapping[str, np.ndarray]

    def __post_init__(self) -> None:
        n = len(self.labels)
        if len(self.groups) != n or any(len(v) != n for v in self.logits.values()):
            raise ValueError("labels, groups and every detector's logits must have one entry per image")
        if not self.logits:
            raise ValueError("no detector scores")

    def only(self, rows: np.ndarray) -> Scored:
        """These images alone (a boolean mask or indices)."""
        return Scored(self.labels[rows], tuple(np.asarray(self.groups)[rows].tolist()),
                      {name: z[rows] for name, z in self.logits.items()})


def group_weights(labels: np.ndarray, groups: Sequence[str]) -> np.ndarray:
    counts: dict[tuple[int, str], int] = {}
    for label, group in zip(labels.tolist(), groups, strict=True):
        counts[(label, group)] = counts.get((label, group), 0) + 1
    return np.array([1.0 / counts[(label, group)] for label, group in zip(labels.tolist(), groups, strict=True)])


def balanced_auc(labels: np.ndarray, groups: Sequence[str], scores: np.ndarray) -> float | None:
    """ROC-AUC with each group weighing the same; None without both classes."""
    if len(set(labels.tolist())) < 2:
        return None
    return ranked_auc(labels, scores, group_weights(labels, groups))


def auc_by_group(labels: np.ndarray, groups: Sequence[str], scores: np.ndarray) -> dict[str, float]:
    """Each group's balanced AUC against all of the other class's groups.

    The balanced AUC is the mean, over every (real source, generator) pair, of that pair's AUC, so a class's
    groups average to it exactly. ``(1 - auc) / (groups in its class)`` is then what one group costs the
    balanced AUC, and a class's costs sum to the whole miss, ``1 - balanced AUC``. It names the sources that
    hold a validation back, which a per-group accuracy at one threshold cannot: that moves with calibration."""
    labels = np.asarray(labels)
    if len(set(labels.tolist())) < 2:
        return {}
    names, weights = np.asarray(groups), group_weights(labels, groups)
    out: dict[str, float] = {}
    for label, group in sorted(set(zip(labels.tolist(), groups, strict=True))):
        rows = ((names == group) & (labels == label)) | (labels != label)
        out[group] = ranked_auc(labels[rows], scores[rows], weights[rows])
    return out


@dataclass(frozen=True)
class Interval:
    value: float
    low: float  # the 2.5th and 97.5th percentiles of the bootstrap
    high: float


def resampled_cells(labels: np.ndarray, groups: Sequence[str], draws: int, seed: int) -> Iterator[np.ndarray]:
    """``draws`` resamples of the images, each drawn with replacement within its (group, label) cell: every
    group keeps its size and its equal weight, so an interval is the noise of the images a group happened to
    hold, not of which groups exist."""
    names = np.asarray(groups)
    cells = [np.flatnonzero((names == g) & (labels == y)) for g, y in sorted(set(zip(groups, labels.tolist())))]
    rng = np.random.default_rng(seed)
    for _ in range(draws):
        yield np.concatenate([rng.choice(cell, len(cell)) for cell in cells])


def bootstrap_auc(scored: Scored, draws: int = 1000, seed: int = 0) -> dict[str, Interval]:
    """Each detector's balanced AUC and each pair's difference (``"a - b"``), with 95% bootstrap intervals.

    Images are resampled within their group, so every draw keeps every group and its equal weight: the
    interval is the sampling noise of the images a group happened to hold, not of which groups exist. The
    draws are paired (one resample scores every detector), so a difference's interval is far narrower than
    the two AUCs' intervals side by side: what says whether an ablation moved anything."""
    names = list(scored.logits)
    point = {n: balanced_auc(scored.labels, scored.groups, scored.logits[n]) for n in names}
    if any(v is None for v in point.values()):
        return {}
    # Resampling within (group, label) cells keeps every cell's size, so a draw's group weights are the
    # original ones, drawn along: computed once, not once per draw and detector.
    weights = group_weights(scored.labels, scored.groups)
    pairs = list(itertools.combinations(names, 2))
    samples: dict[str, list[float]] = {key: [] for key in [*names, *(f"{a} - {b}" for a, b in pairs)]}
    for index in resampled_cells(scored.labels, scored.groups, draws, seed):
        auc = {n: ranked_auc(scored.labels[index], scored.logits[n][index], weights[index]) for n in names}
        for n in names:
            samples[n].append(auc[n])
        for a, b in pairs:
            samples[f"{a} - {b}"].append(auc[a] - auc[b])
    values = {**point, **{f"{a} - {b}": point[a] - point[b] for a, b in pairs}}  # type: ignore[operator]
    return {key: Interval(round(float(values[key]), 4), round(float(np.percentile(v, 2.5)), 4),
                          round(float(np.percentile(v, 97.5)), 4)) for key, v in samples.items()}


def fuse(logits: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """The default fusion hook's logit: weighted mean of calibrated logits (weights need not sum to 1)."""
    total = sum(weights.get(name, 0.0) for name in logits)
    if total <= 0:
        raise ValueError("fusion weights must give some detector a positive weight")
    return sum(weights.get(name, 0.0) * z for name, z in logits.items()) / total  # type: ignore[return-value]


def simplex(names: Sequence[str], step: float) -> list[dict[str, float]]:
    """Every weighting of ``names`` on a grid of ``step`` summing to 1."""
    parts = round(1 / step)
    out = []
    for combo in itertools.product(range(parts + 1), repeat=len(names)):
        if sum(combo) == parts:
            out.append({name: round(k / parts, 6) for name, k in zip(names, combo, strict=True)})
    return out


@dataclass(frozen=True)
class WeightChoice:
    weights: dict[str, float]
    auc: float
    equal_auc: float  # the equal weighting, for comparison


def choose_weights(scored: Scored, step: float = 0.1) -> WeightChoice:
    """The grid weighting with the highest group-balanced AUC; ties go to the one nearest equal weights."""
    names = sorted(scored.logits)
    equal = {name: 1.0 / len(names) for name in names}

    def auc(weights: Mapping[str, float]) -> float:
        return balanced_auc(scored.labels, scored.groups, fuse(scored.logits, weights)) or 0.0

    def distance(weights: Mapping[str, float]) -> float:
        return sum((weights[n] - equal[n]) ** 2 for n in names)

    best = max(simplex(names, step), key=lambda w: (round(auc(w), 9), -distance(w)))
    return WeightChoice(best, auc(best), auc(equal))


@dataclass(frozen=True)
class FusedCalibration:
    """The fused logit's own calibration, ``sigmoid(scale * logit + bias)``: fitted on held-out sources it
    makes the published probability mean what it says on content no detector trained on."""

    scale: float
    bias: float


def fit_fused_calibration(labels: np.ndarray, groups: Sequence[str], logits: np.ndarray) -> FusedCalibration:
    """Platt scaling of the fused logit, each group weighing the same and the two classes equally in all."""
    from sklearn.linear_model import LogisticRegression

    weights = group_weights(labels, groups)
    for label in (0, 1):
        weights[labels == label] /= weights[labels == label].sum()
    model = LogisticRegression(C=1e4, max_iter=1000)
    model.fit(logits.reshape(-1, 1), labels, sample_weight=weights * len(labels))
    return FusedCalibration(round(float(model.coef_[0][0]), 6), round(float(model.intercept_[0]), 6))


def _by_group(labels: np.ndarray, groups: Sequence[str], label: int) -> dict[str, np.ndarray]:
    names = sorted({g for g, y in zip(groups, labels.tolist(), strict=True) if y == label})
    index = np.asarray(groups)
    return {name: (index == name) & (labels == label) for name in names}


@dataclass(frozen=True)
class ThresholdChoice:
    ai_threshold: float
    real_threshold: float
    worst_false_flag: float  # the worst real source's share called ai_generated
    mean_false_clear: float  # generators' mean share called real
    ai_target_met: bool
    real_target_met: bool


def choose_thresholds(labels: np.ndarray, groups: Sequence[str], probs: np.ndarray, max_false_flag: float = 0.05,
                      max_false_clear: float = 0.10) -> ThresholdChoice:
    """See the module docstring. A target no threshold meets gets the strictest grid value, and says so.

    ``probs`` is (images,) or (copies, images): the same images' probabilities as the stream may carry them
    (the original bytes, a platform's JPEG re-encode, its downscale). Each target then holds on every copy,
    as if the whole stream were that copy: a real source's photos resized on upload are still that source's,
    and the 2% rule is theirs too. The choice's ``worst_false_flag`` and ``mean_false_clear`` are then those
    of the copy that bounds it."""
    reals, fakes = _by_group(labels, groups, 0), _by_group(labels, groups, 1)
    if not reals or not fakes:
        raise ValueError("choosing thresholds needs real and generated images")
    copies = np.atleast_2d(probs)

    def worst_flag(t: float) -> float:
        return max(float(np.mean(p[m] >= t)) for p in copies for m in reals.values())

    def mean_clear(t: float) -> float:
        return max(float(np.mean([np.mean(p[m] <= t) for m in fakes.values()])) for p in copies)

    ai_ok = [t for t in THRESHOLD_GRID if t >= 0.5 and worst_flag(t) <= max_false_flag]
    ai = float(ai_ok[0]) if ai_ok else float(THRESHOLD_GRID[-1])
    real_ok = [t for t in THRESHOLD_GRID if t < min(ai, 0.5 + 1e-9) and mean_clear(t) <= max_false_clear]
    real = float(real_ok[-1]) if real_ok else float(THRESHOLD_GRID[0])
    return ThresholdChoice(ai, real, round(worst_flag(ai), 6), round(mean_clear(real), 6), bool(ai_ok), bool(real_ok))


def verdict_rates(labels: np.ndarray, groups: Sequence[str], probs: np.ndarray, ai_threshold: float,
                  real_threshold: float) -> dict[str, dict[str, float | int | str]]:
    """Per group: how many images, and the shares judged ai_generated / uncertain / real, plus accuracy
    at 0.5 (the share on the right side of even odds, whatever the policy)."""
    out: dict[str, dict[str, float | int | str]] = {}
    for label, kind in ((0, "real"), (1, "ai")):
        for name, mask in _by_group(labels, groups, label).items():
            p = probs[mask]
            ai = float(np.mean(p >= ai_threshold))
            real = float(np.mean(p <= real_threshold))
            correct = p < 0.5 if label == 0 else p >= 0.5
            out[name] = {"kind": kind, "n": int(mask.sum()), "ai_generated": round(ai, 4),
                         "uncertain": round(1 - ai - real, 4), "real": round(real, 4),
                         "accuracy_at_0.5": round(float(np.mean(correct)), 4)}
    return out


# Issue 12's decision aims, besides the 2% rule the thresholds are chosen under: what a generator's images
# flagged and all images `uncertain` should be. `operating_points` prices each one on a pool's ranking.
FLAGGED_AIM = 0.75
UNCERTAIN_AIM = 0.20


@dataclass(frozen=True)
class OperatingPoint:
    """What one pair of thresholds decides on a pool: group shares averaged as `verdict_rates` gives them,
    ``uncertain`` over all images, as the aim counts it."""

    ai_threshold: float
    real_threshold: float
    worst_false_flag: float  # the worst real source's share flagged
    real_sources_over: int  # real sources with more than max_false_flag flagged
    real_flagged: float  # real sources' mean share flagged
    real_cleared: float
    generators_flagged: float
    generators_cleared: float
    uncertain: float


def operating_point(labels: np.ndarray, groups: Sequence[str], probs: np.ndarray, ai_threshold: float,
                    real_threshold: float, max_false_flag: float = 0.05) -> OperatingPoint:
    reals, fakes = _by_group(labels, groups, 0), _by_group(labels, groups, 1)
    if not reals or not fakes:
        raise ValueError("an operating point needs real and generated images")
    flagged = [float(np.mean(probs[m] >= ai_threshold)) for m in reals.values()]
    return OperatingPoint(
        ai_threshold, real_threshold, round(max(flagged), 4), sum(f > max_false_flag for f in flagged),
        round(float(np.mean(flagged)), 4),
        round(float(np.mean([np.mean(probs[m] <= real_threshold) for m in reals.values()])), 4),
        round(float(np.mean([np.mean(probs[m] >= ai_threshold) for m in fakes.values()])), 4),
        round(float(np.mean([np.mean(probs[m] <= real_threshold) for m in fakes.values()])), 4),
        round(float(np.mean((probs > real_threshold) & (probs < ai_threshold))), 4))


def operating_points(labels: np.ndarray, groups: Sequence[str], probs: np.ndarray, chosen: ThresholdChoice,
                     max_false_flag: float = 0.05, flagged_aim: float = FLAGGED_AIM,
                     uncertain_aim: float = UNCERTAIN_AIM) -> dict[str, OperatingPoint]:
    """The chosen policy beside what each aim it misses would cost if the thresholds alone were moved to meet
    it, within the bounds `choose_thresholds` keeps (``ai_threshold`` at least 0.5, ``real_threshold`` at most
    0.5: no verdict against the calibrated odds):
    - ``flagged_aim``: the highest ``ai_threshold`` at which generators have ``flagged_aim`` of their images
      flagged on average (``real_threshold`` as chosen, or just under it);
    - ``uncertain_aim``: ``ai_threshold`` as chosen, the lowest ``real_threshold`` at which at most
      ``uncertain_aim`` of all images are uncertain.
    Where no threshold within the bounds meets an aim, its point is the bound, which the caller reads as not
    met; an aim the chosen policy meets costs nothing, and its point is the chosen one."""

    def point(ai: float, real: float) -> OperatingPoint:
        return operating_point(labels, groups, probs, ai, real, max_false_flag)

    here = point(chosen.ai_threshold, chosen.real_threshold)
    flag_point = here
    if here.generators_flagged < flagged_aim:
        ais = [float(t) for t in THRESHOLD_GRID if 0.5 <= t < chosen.ai_threshold]
        ai = next((t for t in reversed(ais) if point(t, chosen.real_threshold).generators_flagged >= flagged_aim),
                  ais[0] if ais else chosen.ai_threshold)
        flag_point = point(ai, min(chosen.real_threshold, float(THRESHOLD_GRID[THRESHOLD_GRID < ai][-1])))
    uncertain_point = here
    if here.uncertain > uncertain_aim:
        reals = [float(t) for t in THRESHOLD_GRID if chosen.real_threshold < t <= 0.5 and t < chosen.ai_threshold]
        real = next((t for t in reals if point(chosen.ai_threshold, t).uncertain <= uncertain_aim),
                    reals[-1] if reals else chosen.real_threshold)
        uncertain_point = point(chosen.ai_threshold, real)
    return {"chosen": here, "flagged_aim": flag_point, "uncertain_aim": uncertain_point}


# What a policy decides, compared between two verdicts by `bootstrap_policy`.
DECISION_MEASURES = ("generators_flagged", "uncertain", "real_cleared")


def bootstrap_policy(labels: np.ndarray, groups: Sequence[str], probs: Mapping[str, np.ndarray],
                     max_false_flag: float = 0.05, max_false_clear: float = 0.10, draws: int = 1000,
                     seed: int = 0) -> dict[str, Interval]:
    """What the policy `choose_thresholds` picks decides (`DECISION_MEASURES`) for each of two verdicts on the
    same images (``probs``: two names), and the differences (``"a - b"``), with paired 95% intervals: each
    resample (`resampled_cells`, one for both) has its thresholds chosen again, as a platform's own images
    would have had them chosen.

    `ai_threshold` is set by a few images, the most generated-looking photos of the worst real source, so
    a verdict can flag several points more of every generator's images without ranking any better, and on
    another draw of the same sources not. A point estimate of the decision is no evidence of a change; this
    interval is."""
    if len(probs) != 2:
        raise ValueError("the policy is compared between two verdicts")
    names = np.asarray(groups)
    (a, pa), (b, pb) = probs.items()

    def decided(index: np.ndarray) -> dict[str, float]:
        y, g, out = labels[index], names[index].tolist(), {}
        for name, p in ((a, pa[index]), (b, pb[index])):
            chosen = choose_thresholds(y, g, p, max_false_flag, max_false_clear)
            point = operating_point(y, g, p, chosen.ai_threshold, chosen.real_threshold, max_false_flag)
            out |= {f"{name} {m}": getattr(point, m) for m in DECISION_MEASURES}
        return out | {f"{a} - {b} {m}": out[f"{a} {m}"] - out[f"{b} {m}"] for m in DECISION_MEASURES}

    point = decided(np.arange(len(labels)))
    samples = [decided(index) for index in resampled_cells(labels, groups, draws, seed)]
    bounds = {key: np.percentile([d[key] for d in samples], [2.5, 97.5]) for key in point}
    return {key: Interval(round(value, 4), round(float(bounds[key][0]), 4), round(float(bounds[key][1]), 4))
            for key, value in point.items()}


@dataclass(frozen=True)
class CarryOver:
    """The policy rule applied to a group it was not chosen on: thresholds chosen on every other group."""

    group: str
    kind: str  # "real" or "ai"
    ai_threshold: float
    real_threshold: float
    ai_generated: float  # the group's share at or over that ai_threshold
    real: float  # its share at or under that real_threshold
    copies_ai_generated: tuple[float, ...] = ()  # its share flagged on each further copy (`choose_thresholds`)


def policy_carry_over(labels: np.ndarray, groups: Sequence[str], probs: np.ndarray, max_false_flag: float = 0.05,
                      max_false_clear: float = 0.10,
                      refit: Callable[[np.ndarray], np.ndarray] | None = None) -> list[CarryOver]:
    """Each group judged under the thresholds `choose_thresholds` picks without it.

    The pooled scores are unseen by every detector, but the thresholds are chosen on them: the worst real
    source sets ``ai_threshold`` with its own images counted. A source the product meets later has no say,
    so a real source flagged over ``max_false_flag`` here is what the rule costs on one it never saw. The
    only group of its class is left out: without it there is no threshold to choose. ``refit``: the
    probabilities of every image under what else was chosen on the pool (fusion weights, calibration),
    chosen again on the images of a mask (the other groups), so the left-out group has no say in any of it.
    With copies (``probs`` and ``refit``'s answer (copies, images), the original bytes first, as
    `choose_thresholds` takes them) the thresholds hold on every copy of the other groups, and the group's
    share flagged is given on each copy too."""
    index = np.asarray(groups)
    out = []
    for name in sorted(set(groups)):
        rest = index != name
        classes = set(labels[~rest].tolist())
        if len(classes) != 1:
            raise ValueError(f"group {name!r} holds both real and generated images")
        kind = "real" if classes == {0} else "ai"
        if len(set(labels[rest].tolist())) < 2:  # the only group of its class: nothing to choose on without it
            continue
        chosen = np.atleast_2d(probs if refit is None else refit(rest))
        own = chosen[:, ~rest]
        t = choose_thresholds(labels[rest], list(index[rest]), chosen[:, rest], max_false_flag, max_false_clear)
        flagged = [round(float(np.mean(p >= t.ai_threshold)), 4) for p in own]
        out.append(CarryOver(name, kind, t.ai_threshold, t.real_threshold, flagged[0],
                             round(float(np.mean(own[0] <= t.real_threshold)), 4), tuple(flagged[1:])))
    return out


def carried_over_auc(labels: np.ndarray, groups: Sequence[str],
                     refit: Callable[[np.ndarray], np.ndarray]) -> float | None:
    """The balanced AUC with no group having had a say in what was chosen on the pool (as in
    `policy_carry_over`, ``refit`` scores every image under a choice made on a mask's images).

    Fusion weights chosen on the pooled held-out scores are fitted to the very groups they are then judged
    on, so the pooled balanced AUC is a little optimistic. The balanced AUC is the mean of the (real source,
    generator) pairs' AUCs, so here each pair is ranked under what was chosen without both of its groups: one
    choice a pair, as the product would meet two new sources, and no calibration shift between them (which
    scoring each group under its own left-out choice would add). None when a class has a single group:
    without it there is nothing to choose on."""
    reals, fakes = _by_group(labels, groups, 0), _by_group(labels, groups, 1)
    if len(reals) < 2 or len(fakes) < 2:
        return None
    aucs = []
    for real, fake in itertools.product(reals.values(), fakes.values()):
        pair = real | fake
        aucs.append(ranked_auc(labels[pair], refit(~pair)[pair]))
    return float(np.mean(aucs))

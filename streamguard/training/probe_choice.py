"""Choosing a linear probe's regularisation, and on every block's class token which blocks it reads, on
training groups it was not fitted on.

Chosen on the val split, C picks what fits the sources training has seen: under leave-one-source-out the
val split chose C = 30, the top of its grid, in every fold, while a fixed larger C did better on the unseen
groups (docs/validation.md). Here each candidate is fitted with some training groups left out at a time
(packed into folds by `plan_folds`, the LOSO machinery's) and scored on them; the candidate whose pooled
left-out scores rank best (balanced AUC: each group weighs the same) is the one fitted on all of training.
On class tokens a candidate also reads a window of blocks: RINE (Koutlis & Papadopoulos 2024) found that
the intermediate blocks carry a generator's traces and the last ones CLIP's semantics, which is what
differs between sources.

Or no candidate is chosen (``"average"``): every candidate's probe, fitted on all of training and scaled to
the same spread of logits there, averaged into one linear head. Under LOSO the choice on groups picked a
different candidate almost fold by fold (8 of the 24 in 26 folds) and ranked the unseen groups below most
single candidates it chose among; the average of all of them ranked above (docs/validation.md, step 49).
The average can also be fitted blind to what tells training's real sources apart (`source_directions`):
measured, it ranked as before and decided no surely better (step 50).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import structlog

from streamguard.detectors.calibration import Calibration
from streamguard.evaluation.calibrate import fit_calibration
from streamguard.evaluation.datasets import REAL
from streamguard.evaluation.selection import balanced_auc
from streamguard.training.data import is_held_out
from streamguard.training.loso import Fold, groups_of, plan_folds, pool_groups
from streamguard.training.renders import SOURCE as RENDERED

log = structlog.get_logger(__name__)

# The val split's grid (`choose_on="val"`, the rule before 2026-12-04).
VAL_C_GRID = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
# 30 is the val split's choice; on groups left out it ranked best in none of the 26 LOSO folds, 300-30,000
# did (docs/validation.md).
GROUP_C_GRID = (30.0, 300.0, 3000.0, 30000.0)
# Windows of the blocks in sixths of the depth, [first, stop): on CLIP ViT-B/16's 12 blocks all, without
# the last two, the middle eight, the later two thirds, the earlier two thirds, the last half.
BLOCK_WINDOWS_SIXTHS = ((0, 6), (0, 5), (1, 5), (2, 6), (0, 4), (3, 6))
INNER_FOLDS = 5


@dataclass(frozen=True)
class Candidate:
    c: float
    blocks: tuple[int, int] | None = None  # [first, stop) of the class tokens read; None: every column

    @property
    def label(self) -> str:
        # Blocks counted from 1, as the docs count them; `blocks` itself is a slice.
        return f"C={self.c:g}" + ("" if self.blocks is None else f" blocks {self.blocks[0] + 1}-{self.blocks[1]}")


def candidates(c_grid: Sequence[float], n_blocks: int) -> list[Candidate]:
    """Every C, on every window that fits ``n_blocks`` class tokens (all columns when features are one
    embedding, ``n_blocks`` 0)."""
    if n_blocks <= 1:
        return [Candidate(c) for c in c_grid]
    windows = list(dict.fromkeys((round(a * n_blocks / 6), round(b * n_blocks / 6)) for a, b in BLOCK_WINDOWS_SIXTHS))
    return [Candidate(c, w) for w in windows if w[1] > w[0] for c in c_grid]


def unit_length(x: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length, as the served probe (`LinearProbe`) normalises its input."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def columns(x: np.ndarray, candidate: Candidate, n_blocks: int) -> np.ndarray:
    """The features ``candidate`` reads, unit length as the served probe normalises its input."""
    if candidate.blocks is not None:
        width = x.shape[1] // n_blocks
        x = x[:, candidate.blocks[0] * width:candidate.blocks[1] * width]
    return unit_length(x)


def served_coefficients(coef: np.ndarray, candidate: Candidate | None, x: np.ndarray, n_blocks: int) -> np.ndarray:
    """The weights over all of ``x``'s columns that compute, on the served head's input (every block's unit
    class token, concatenated and normalised as one), what ``coef`` computes on the window it was fitted on.
    ``candidate`` None: an averaged probe (`average_probes`), whose weights span every column already.

    Each block's token is unit length, so the served norm is sqrt(n_blocks) and the window's sqrt(k): the
    window's weights scaled by sqrt(n_blocks / k), the other blocks' 0."""
    if candidate is None or candidate.blocks is None:
        return coef
    width = x.shape[1] // n_blocks
    norms = np.linalg.norm(x.reshape(len(x), n_blocks, width), axis=2)
    if not np.allclose(norms, 1.0, atol=1e-3):
        raise ValueError("a block window needs every block's features at unit length (class_token_features)")
    first, stop = candidate.blocks
    full = np.zeros((coef.shape[0], x.shape[1]), coef.dtype)
    full[:, first * width:stop * width] = coef * math.sqrt(n_blocks / (stop - first))
    return full


@dataclass(frozen=True)
class Embedded:
    """A split's embeddings: one row per view, ``owner`` the index in ``samples`` of the image a row is a view
    of (one row per image under the resized view)."""

    x: np.ndarray
    owner: np.ndarray
    samples: list  # type: ignore[type-arg]

    @property
    def y(self) -> np.ndarray:
        return np.asarray([s.label for s in self.samples], np.int64)

    @property
    def row_y(self) -> np.ndarray:
        return self.y[self.owner]

    def per_image(self, row_logits: np.ndarray) -> np.ndarray:
        """Each image's logit: the mean of its views' (`aggregate_logits`' mean, as served)."""
        sums = np.bincount(self.owner, weights=row_logits, minlength=len(self.samples))
        return sums / np.maximum(np.bincount(self.owner, minlength=len(self.samples)), 1)

    def without(self, ids: set[str]) -> Embedded:
        keep = [i for i, s in enumerate(self.samples) if s.id not in ids]
        renumber = np.full(len(self.samples), -1, np.int64)
        renumber[keep] = np.arange(len(keep))
        rows = renumber[self.owner] >= 0
        return Embedded(self.x[rows], renumber[self.owner[rows]], [self.samples[i] for i in keep])

    def joined(self, other: Embedded | None) -> Embedded:
        """These images' rows and then ``other``'s (other images, e.g. generated twins of real ones, renders)."""
        if other is None or not other.samples:
            return self
        owner = np.concatenate([self.owner, other.owner + len(self.samples)])
        return Embedded(np.concatenate([self.x, other.x]), owner, self.samples + other.samples)


def stack_draws(draws: Sequence[Embedded]) -> Embedded:
    """Every draw's rows of each image as views of that image (an image a draw skipped is left out of all)."""
    common = set.intersection(*({s.id for s in d.samples} for d in draws))
    kept = [d.without({s.id for s in d.samples} - common) for d in draws]
    order = {s.id: i for i, s in enumerate(kept[0].samples)}
    owners = [np.asarray([order[s.id] for s in d.samples], np.int64)[d.owner] for d in kept]
    return Embedded(np.concatenate([d.x for d in kept]), np.concatenate(owners), kept[0].samples)


Features = Callable[[np.ndarray, Candidate], np.ndarray]  # rows -> what the candidate's probe reads
Fit = Callable[[Candidate, np.ndarray, np.ndarray], object]  # (candidate, features, y) -> an sklearn model


def choose_by_groups(train: Embedded, val: Embedded, cands: Sequence[Candidate], features: Features, fit: Fit,
                     pools: dict[str, str], folds: Sequence[Fold],
                     originals: Embedded | None = None,
                     extra: Embedded | None = None) -> tuple[Candidate, dict[str, float]] | None:
    """The candidate whose left-out scores rank best over ``folds`` (of training's groups), with
    every candidate's pooled balanced AUC; None when the folds leave nothing to rank (one class only).

    Each fold's model is fitted on train's rows outside the fold, calibrated (temperature) on val's, and
    scores the fold's images in ``originals`` (train's and val's images unaugmented, as a held-out image is
    scored; without them, train's and val's own rows): calibrated, so that pooling folds compares like with
    like, as `train loso` pools its folds. ``extra``: training rows beyond train's images, fitted on beside
    them and left out when their own group is (a real photo's generated twin, `matched`, keeps its photo's
    source and leaves with it; a render, `renders`, is of no data's group and is never left out)."""
    pooled: dict[Candidate, tuple[list[int], list[str], list[float]]] = {c: ([], [], []) for c in cands}
    everyone = train.samples + val.samples + (extra.samples if extra is not None else [])
    for fold in folds:
        left = {s.id for s in everyone if is_held_out(s, fold.generators, fold.sources)}
        fit_on = train.without(left).joined(None if extra is None else extra.without(left))
        calibrate_on = val.without(left)
        if len(set(fit_on.row_y.tolist())) < 2:
            continue
        sources = (train, val) if originals is None else (originals,)
        scored = [e for e in (split.without({s.id for s in split.samples} - left) for split in sources) if e.samples]
        for cand in cands:
            model = fit(cand, features(fit_on.x, cand), fit_on.row_y)

            def image_logits(split: Embedded) -> np.ndarray:
                return split.per_image(model.decision_function(features(split.x, cand)))  # type: ignore[attr-defined]

            calibration = Calibration()
            if len(set(calibrate_on.y.tolist())) == 2:
                calibration = fit_calibration(image_logits(calibrate_on).tolist(), calibrate_on.y.tolist(),
                                              method="temperature", fitted_on="val outside the fold")
            labels, groups, scores = pooled[cand]
            for split in scored:
                labels.extend(split.y.tolist())
                groups.extend(pools.get(s.group, s.group) for s in split.samples)
                scores.extend(calibration.apply(float(z)) for z in image_logits(split))
    aucs = {c: balanced_auc(np.array(v[0], np.int64), v[1], np.array(v[2])) for c, v in pooled.items()}
    ranked = {c: a for c, a in aucs.items() if a is not None}
    if not ranked:
        return None
    best = max(ranked, key=lambda c: ranked[c])  # the first of equals: the grid's order
    return best, {c.label: round(a, 4) for c, a in ranked.items()}


@dataclass(frozen=True)
class AveragedProbe:
    """Linear probes averaged into one: ``coef_`` over every column of the served head's input."""

    coef_: np.ndarray  # (1, features)
    intercept_: np.ndarray  # (1,)
    normalise: bool

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        return (unit_length(x) if self.normalise else x) @ self.coef_[0] + self.intercept_[0]


def source_directions(x: np.ndarray, y: np.ndarray, groups: Sequence[str | None]) -> np.ndarray:
    """An orthonormal basis (columns) of the directions along which the mean rows of ``x``'s real sources
    differ: each source's mean, less the mean of those means (each source weighs the same), and the span they
    make; rows of group None are no source's. None of them says whether an image was generated; a probe that
    reads them tells the sources it saw apart and meets an unseen one somewhere along them (nuisance
    attribute projection, as speaker verification removes the channel; Solomonoff et al., 2005)."""
    real = y == REAL
    names = sorted({g for g, r in zip(groups, real, strict=True) if r and g is not None})
    if len(names) < 2:
        return np.zeros((x.shape[1], 0), x.dtype)
    at = np.asarray(groups)
    means = np.stack([x[real & (at == name)].mean(axis=0) for name in names])
    _, sizes, directions = np.linalg.svd(means - means.mean(axis=0), full_matrices=False)
    return directions[sizes > sizes[0] * 1e-6].T


def refuse_unaveraged_blindness(choose_on: str, without_sources: bool) -> None:
    """Only the averaged probe is fitted blind to the real sources' directions: a probe chosen on groups or on
    val would be chosen among candidates that read them."""
    if without_sources and choose_on != "average":
        raise ValueError("without_source_directions is for the averaged probe (choose_on average)")


def average_probes(train: Embedded, cands: Sequence[Candidate], features: Features, fit: Fit, n_blocks: int,
                   normalise: bool, without_sources: bool = False) -> AveragedProbe:
    """Every candidate fitted on ``train``'s rows, each divided by the spread (standard deviation) of its
    logits on those rows, then averaged: C scales the logits (on CLIP's class tokens C = 3,000 and 30,000
    spread them ~3x wider than C = 30), and undivided the loosest fits would be most of the average. Linear,
    so served as one head. ``without_sources``: each candidate fitted and served blind to the directions its
    features' real sources differ along (`source_directions`), still one linear head."""
    coefs, intercepts = [], []
    # The procedural screenshots are a kind of image the real class is given on purpose, not a source whose
    # look is a nuisance: the direction from photos to them is one the probe should keep.
    groups = [None if train.samples[i].source == RENDERED else train.samples[i].group
              for i in train.owner] if without_sources else []
    for cand in cands:
        x = features(train.x, cand)
        basis = source_directions(x, train.row_y, groups) if without_sources else None
        if basis is not None:
            x = x - (x @ basis) @ basis.T
        model = fit(cand, x, train.row_y)
        spread = float(np.std(model.decision_function(x))) or 1.0  # type: ignore[attr-defined]
        coef = model.coef_  # type: ignore[attr-defined]
        if basis is not None:
            coef = coef - (coef @ basis) @ basis.T  # w.(x - B B'x) = (w - w B B').x: one head still
        coefs.append(served_coefficients(coef, cand, train.x, n_blocks) / spread)
        intercepts.append(model.intercept_ / spread)  # type: ignore[attr-defined]
    return AveragedProbe(np.mean(coefs, axis=0), np.mean(intercepts, axis=0), normalise)


@dataclass(frozen=True)
class Choice:
    candidate: Candidate | None  # None: every candidate averaged (`average_probes`)
    model: object  # the sklearn LogisticRegression fitted on all of train, or an `AveragedProbe`
    chosen_on: str  # "groups (N folds)", "val" or "average (N probes)"
    scores: dict[str, float]  # each candidate's left-out balanced AUC, or val AUC; none when averaged

    @property
    def c(self) -> float | None:
        return None if self.candidate is None else self.candidate.c

    @property
    def blocks(self) -> tuple[int, int] | None:
        return None if self.candidate is None else self.candidate.blocks


def choose_probe(choose_on: str, train: Embedded, val: Embedded, n_blocks: int, normalise: bool = True,
                 originals: Embedded | None = None, extra: Embedded | None = None,
                 without_sources: bool = False) -> Choice:
    """The probe's candidate, chosen on training's groups left out in turn (``choose_on`` "groups"; on the
    val split when training has fewer than two groups or they leave one class only) or on the val split
    ("val"), and fitted on all of train; or every candidate averaged ("average", `average_probes`).
    ``normalise``: features are embeddings (unit length to the probe), not a score. ``originals``: train's and
    val's images unaugmented, what a left-out group is scored on.
    ``extra``: training rows beyond train's images (twins, renders), fitted on with train (`choose_by_groups`).
    ``without_sources``: the averaged probes blind to what tells training's real sources apart (`average_probes`)."""
    from sklearn.linear_model import LogisticRegression

    from streamguard.evaluation.metrics import binary_metrics

    def features(x: np.ndarray, cand: Candidate) -> np.ndarray:
        return columns(x, cand, n_blocks) if normalise else x

    def fit(cand: Candidate, x: np.ndarray, y: np.ndarray) -> LogisticRegression:
        return LogisticRegression(C=cand.c, max_iter=5000, class_weight="balanced").fit(x, y)

    if choose_on == "average":
        cands = candidates(GROUP_C_GRID, n_blocks)
        log.info("train.averaged", probes=len(cands))
        averaged = average_probes(train.joined(extra), cands, features, fit, n_blocks, normalise, without_sources)
        return Choice(None, averaged, f"average ({len(cands)} probes)", {})
    refuse_unaveraged_blindness(choose_on, without_sources)

    if choose_on == "groups":
        dev = train.samples + val.samples
        pools = pool_groups(dev)
        units = len(set(pools.values()))
        if units >= 2:
            folds = plan_folds(groups_of(dev), n_folds=min(INNER_FOLDS, units), pools=pools)
            cands = candidates(GROUP_C_GRID, n_blocks)
            chosen = choose_by_groups(train, val, cands, features, fit, pools, folds, originals, extra)
            if chosen is not None:
                best, scores = chosen
                log.info("train.chosen", on="groups", folds=len(folds), candidate=best.label, auc=scores[best.label])
                everything = train.joined(extra)
                return Choice(best, fit(best, features(everything.x, best), everything.row_y),
                              f"groups ({len(folds)} folds)", scores)
        log.warning("train.choose_on_val", reason="training's groups cannot be left out in turn: fewer than two, "
                    "or one class only")
    train = train.joined(extra)
    best_auc, scores, chosen_model, best = -1.0, {}, None, None
    for cand in candidates(VAL_C_GRID, 0):
        model = fit(cand, features(train.x, cand), train.row_y)
        auc = binary_metrics(val.y, val.per_image(model.decision_function(features(val.x, cand))).tolist()).auc or 0.0
        scores[cand.label] = round(auc, 4)
        log.info("train.candidate", C=cand.c, val_auc=round(auc, 4))
        if auc > best_auc:
            best_auc, chosen_model, best = auc, model, cand
    assert best is not None
    return Choice(best, chosen_model, "val", scores)

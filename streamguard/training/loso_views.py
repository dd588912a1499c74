"""The leave-one-source-out fold models scored again: under other views of the image, or perturbed bytes.

`streamguard train loso` scores each fold's held-out images once, on their original bytes with the shipped
input contract. Two questions need the same held-out images scored otherwise, by the same fold models:
- **Views.** Does a detector gain from native-pixel crops (several, aggregated) or from crops beside the
  resized whole view, against the resized whole view alone? Answered per group, on unseen sources.
- **Robustness.** What do JPEG q75 and a 0.5x downscale cost on unseen sources (not on the seen test split,
  where a detector may have memorised the generator)?
- **Serving.** Does a faster encoder (int8, ONNX Runtime) keep the AUC on unseen sources, not only on the
  test split? Scored on the shared trunk that `backbone.precision` / `backbone.runtime` give the worker.

Each variant is scored through the serving path (the detector's `DetectorSpec` from its fold's weights,
run by a `DetectorRunner`), so the numbers are what the worker would publish. Results sit beside the fold's
``held_out.json`` as ``held_out.<variant>.json``; a variant already scored for a fold is not scored again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from streamguard.config import Settings
from streamguard.detectors.calibration import sigmoid
from streamguard.evaluation.datasets import Sample
from streamguard.evaluation.selection import Scored, balanced_auc, bootstrap_auc, fuse, verdict_rates
from streamguard.intake import InputContract
from streamguard.intake.contract import RESIZE, with_views
from streamguard.training.held_out import (HeldOutScore, fold_folders, load_held_out, load_variant_scores,
                                          variant_file)
from streamguard.training.loso import REPORT_FILE, Fold, LosoConfig, fold_dir, read_unseen_scores, score_logit
from streamguard.training.nirnet.recipe import ABLATIONS as NIRNET_ABLATIONS

log = structlog.get_logger(__name__)

# The encoder a variant is served at: `backbone.precision`, with ``ort-`` for `backbone.runtime = onnxruntime`.
SERVINGS = ("fp32", "int8", "int8-mixed", "ort-fp32", "ort-int8", "ort-int8-mixed")


@dataclass(frozen=True)
class Variant:
    """``view``: ``resize`` (the shipped contract), ``cropsN`` (N native crops) or ``cropsN+whole``, with
    ``-trimmed`` for a trimmed mean of the crops' logits, then ``-flip`` for each view's mirror image too,
    then ``-inset`` for the photo a screenshot shows;
    ``perturb``: a perturbation name or ``none``;
    ``serving``: one of `SERVINGS` (fp32 is the detector's own unshared model, the reference)."""

    view: str = RESIZE
    perturb: str = "none"
    serving: str = "fp32"

    def __post_init__(self) -> None:
        with_views(InputContract(), self.view)  # refuses an unknown view name
        if self.serving not in SERVINGS:
            raise ValueError(f"unknown serving {self.serving!r} (one of {', '.join(SERVINGS)})")
        if self.serving != "fp32" and self.view != RESIZE:
            # The shared trunk runs the backbone's own contract: another view would not be what is served.
            raise ValueError(f"serving {self.serving} scores the resize view only, not {self.view}")

    @property
    def name(self) -> str:
        name = self.view if self.perturb == "none" else f"{self.view}@{self.perturb}"
        return name if self.serving == "fp32" else f"{name}:{self.serving}"

    def contract(self, base: InputContract) -> InputContract:
        return with_views(base, self.view)

    def settings(self, settings: Settings) -> Settings:
        """``settings`` with the backbone served as ``serving`` says (the shared trunk for all but fp32)."""
        if self.serving == "fp32":
            return settings
        runtime = "onnxruntime" if self.serving.startswith("ort-") else "torch"
        backbone = settings.backbone.model_copy(update={"precision": self.serving.removeprefix("ort-"),
                                                        "runtime": runtime})
        detectors = settings.detectors.model_copy(update={"shared_trunk": True})
        return settings.model_copy(update={"backbone": backbone, "detectors": detectors})


def parse_variant(text: str) -> Variant:
    """``VIEW[@PERTURBATION][:SERVING]``, e.g. ``resize@jpeg75`` or ``resize:ort-int8-mixed``."""
    rest, _, serving = text.partition(":")
    view, _, perturb = rest.partition("@")
    return Variant(view, perturb or "none", serving or "fp32")


def score_variant(settings: Settings, cfg: LosoConfig, method: str, fold: Fold, variant: Variant,
                  samples: dict[str, Sample], limit: set[str] | None = None) -> list[HeldOutScore]:
    """The fold's held-out images (outside the test split, within ``limit`` when given) scored under
    ``variant`` by that fold's model, calibrated as its ``held_out.json``. Images an earlier call scored are
    read back, and only those it did not score are scored (a run with a larger limit extends a smaller one)."""
    directory = fold_dir(cfg, method, fold)
    path = directory / variant_file(variant.name)
    done = {s.id: s for s in load_variant_scores(directory, variant.name)} if path.is_file() else {}
    _, base = load_held_out(directory)
    wanted = [s for s in base if s.split != "test" and (limit is None or s.id in limit)]
    missing = [s for s in wanted if s.id not in done]
    if missing:
        version, scored = _score(settings, method, directory, variant, missing, samples)
        done.update((score.id, score) for score in scored)
        rows = sorted(done.values(), key=lambda s: s.id)
        path.write_text(json.dumps({"variant": asdict(variant), "version": version,
                                    "scores": [asdict(s) for s in rows]}, indent=1) + "\n")
        log.info("loso.variant_scored", method=method, fold=fold.name, variant=variant.name, images=len(missing))
    return [done[s.id] for s in wanted]


def _score(settings: Settings, method: str, directory: Path, variant: Variant, wanted: list[HeldOutScore],
           samples: dict[str, Sample]) -> tuple[str, list[HeldOutScore]]:
    """The model version that scored, and ``wanted`` with the logits it gave under ``variant``."""
    import time

    from streamguard.builtin.cliphead import ClipHeadDetector
    from streamguard.config import DetectorSettings
    from streamguard.detectors.runner import DetectorRunner
    from streamguard.detectors.trunk import SharedTrunks
    from streamguard.evaluation.datasets import SampleReader
    from streamguard.evaluation.perturb import perturb
    from streamguard.intake import decode_image
    from streamguard.scoring import _input

    detector = _detectors()[method]
    # A CLIP head takes the view as the worker would (`detectors.options.<name>.views`, its version naming it);
    # other detectors get it applied to their own contract (NIRNet's crops).
    takes_views = isinstance(detector, ClipHeadDetector)
    own = {"weights_dir": str(directory), **({"views": variant.view} if takes_views else {})}
    # Keyed by the detector's name: an ablation ("nirnet-noise") is read by the detector it ablates.
    options = {**settings.detectors.options, detector.name: own}
    fold_settings = variant.settings(
        settings.model_copy(update={"detectors": settings.detectors.model_copy(update={"options": options})}))
    spec = detector.spec(fold_settings)
    if spec is None or spec.contract is None:
        raise ValueError(f"no {method} model in {directory}")
    contract = spec.contract if takes_views else variant.contract(spec.contract)
    if variant.serving == "fp32":
        # The fold's own model, unshared: a view's contract differs from every other detector's.
        trunks, spec = None, replace(spec, contract=contract, trunk=None)
    elif spec.trunk is None:
        raise ValueError(f"{method} runs on no shared trunk: it has no serving but fp32 to score")
    else:
        trunks = SharedTrunks(fold_settings)
    runner = DetectorRunner(spec, DetectorSettings(timeout_s=None), None, trunks)
    runner.start()
    reader = SampleReader()
    out: list[HeldOutScore] = []
    try:
        if trunks is not None:
            trunks.prepare()
        for lo in range(0, len(wanted), 16):
            chunk = wanted[lo:lo + 16]
            inputs = []
            for score in chunk:
                data = perturb(variant.perturb, reader.read(samples[score.id]), settings.intake)
                side = None if contract.fit == "crop" else contract.size
                inputs.append(_input(decode_image(data, settings.intake, side), contract))
            scored = runner.collect(runner.submit(inputs), len(inputs), time.perf_counter())
            for held, result in zip(chunk, scored, strict=True):
                if result.logit is None:
                    raise RuntimeError(f"{method} failed on {held.id}: {result.error}")
                out.append(replace(held, logit=float(result.logit)))
    finally:
        reader.close()
        runner.close()
        if trunks is not None:
            trunks.close()
    return spec.version, out


def _detectors() -> dict[str, Any]:
    """The built-in detectors a fold trains, by method name: each builds its spec from a weights folder (a
    NIRNet ablation's folder says which branches it has; univfd-blocks' head file says it reads class tokens)."""
    from streamguard.builtin.cliphead import builtin_detectors
    from streamguard.builtin.nirnet.plugin import DETECTOR as NIRNET

    clip = builtin_detectors()
    return {**clip, "univfd-blocks": clip["univfd"], NIRNET.name: NIRNET, **dict.fromkeys(NIRNET_ABLATIONS, NIRNET)}


def compare_variants(pooled: dict[str, list[HeldOutScore]], pools: dict[str, str], ai_threshold: float,
                     real_threshold: float) -> dict[str, Any]:
    """Per variant: balanced AUC and per-group rates over the images every variant scored, and each variant's
    gain over the first (the reference) per group."""
    common = set.intersection(*({s.id for s in v} for v in pooled.values()))
    names = list(pooled)
    out: dict[str, Any] = {"images": len(common), "variants": {}}
    reference: dict[str, Any] | None = None
    logits: dict[str, np.ndarray] = {}
    for name in names:
        rows = sorted((s for s in pooled[name] if s.id in common), key=lambda s: s.id)
        labels = np.array([s.label for s in rows], np.int64)
        groups = tuple(pools.get(s.group, s.group) for s in rows)
        logits[name] = np.array([s.logit for s in rows])
        probs = sigmoid(logits[name])
        auc = balanced_auc(labels, groups, probs)
        rates = verdict_rates(labels, groups, probs, ai_threshold, real_threshold)
        entry = {"balanced_auc": None if auc is None else round(auc, 4), "groups": rates}
        if reference is None:
            reference = entry
        else:
            entry["auc_change"] = None if auc is None else round(auc - reference["balanced_auc"], 4)
            entry["accuracy_change"] = {g: round(float(r["accuracy_at_0.5"]) -
                                                 float(reference["groups"][g]["accuracy_at_0.5"]), 4)
                                        for g, r in rates.items()}
        out["variants"][name] = entry
    if len(names) > 1 and common:
        # Every variant scored the same images (rows in id order), so one paired bootstrap gives each change
        # its interval: what says whether a view or a perturbation moved anything beyond the images' noise.
        intervals = bootstrap_auc(Scored(labels, groups, logits))
        for name in names[1:]:
            pair = intervals.get(f"{names[0]} - {name}")
            if pair is not None:
                out["variants"][name]["auc_change_interval"] = [round(-pair.high, 4), round(-pair.low, 4)]
    return out


def unseen_logits(unseen: dict[str, Path], variants: Sequence[str] = ()) -> dict[str, dict[str, dict[str, float]]]:
    """Each unseen detector's held-out logits outside the test split, as name -> variant name -> id -> logit,
    for ``resize`` (original bytes) and each of ``variants``. Another `train loso` run's method folder gives a
    variant as its own `train loso-variants` run scored it, view and perturbation alike: its fold models are
    served as this run's are. An `eval` scores.csv holds perturbations only, scored under the detector's own
    view: a variant gets its perturbation's rows."""
    import csv

    names = list(dict.fromkeys([RESIZE, *variants]))
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for name, path in unseen.items():
        if path.is_dir():
            rows[name] = {v: {s.id: s.logit for s in read_unseen_scores(path)} if v == RESIZE
                          else _folder_variant_logits(path, v) for v in names}
            continue
        by_perturbation: dict[str, dict[str, float]] = {}
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                if row["score"] and row["split"] != "test":
                    by_perturbation.setdefault(row["perturbation"], {})[row["id"]] = score_logit(row["score"])
        rows[name] = {v: by_perturbation.get(parse_variant(v).perturb, {}) for v in names}
    return rows


def _folder_variant_logits(path: Path, variant: str) -> dict[str, float]:
    """A loso method folder's held-out logits under ``variant``, outside the test split; every fold must have
    scored it, or the fused verdict would cover only some groups."""
    folds = fold_folders(path)
    missing = [d.name for d in folds if not (d / variant_file(variant)).is_file()]
    if missing:
        raise ValueError(f"{path}: folds {missing} have no {variant} scores; run `streamguard train loso-variants "
                         f"--out {path.parent} --method {path.name} --variant {variant}` first")
    return {s.id: s.logit for d in folds for s in load_variant_scores(d, variant) if s.split != "test"}


def fused_variants(pooled: dict[str, dict[str, list[HeldOutScore]]],
                   unseen: dict[str, dict[str, dict[str, float]]], report: dict[str, Any],
                   pools: dict[str, str]) -> dict[str, Any]:
    """``report``'s fused verdict (a `train loso` report: its fusion weights and fused calibration) under each
    variant: the fold-trained methods' variant scores (``pooled``: method -> variant -> scores) fused with
    each unseen detector's logits under the same variant (`unseen_logits`), on the images all of them
    scored. A method or detector the report's fusion does not weigh is left out, so one run compares the
    fusions of two reports (with a detector and without it)."""
    fusion = report["settings"]["fusion"]
    weights, scale, bias = fusion["weights"], fusion.get("scale", 1.0), fusion.get("bias", 0.0)
    rows = {name: by for name, by in unseen.items() if name in weights}
    methods = [m for m in pooled if m in weights]
    if not methods:
        raise ValueError(f"the report's fusion weighs none of {sorted(pooled)} (it weighs {sorted(weights)})")
    fused: dict[str, list[HeldOutScore]] = {}
    for variant_name in pooled[methods[0]]:
        sources = {m: {s.id: s.logit for s in pooled[m][variant_name]} for m in methods}
        sources |= {name: by.get(variant_name, {}) for name, by in rows.items()}
        scored = [s for s in pooled[methods[0]][variant_name] if all(s.id in logits for logits in sources.values())]
        mean = fuse({name: np.array([logits[s.id] for s in scored]) for name, logits in sources.items()}, weights)
        fused[variant_name] = [replace(s, logit=float(scale * z + bias)) for s, z in zip(scored, mean, strict=True)]
    thresholds = report["thresholds"]
    return compare_variants(fused, pools, thresholds["ai_threshold"], thresholds["real_threshold"])


def run_variants(settings: Settings, cfg: LosoConfig, methods: Sequence[str], variants: Sequence[Variant],
                 limit_per_group: int | None = None, unseen: dict[str, Path] | None = None,
                 reports: Sequence[str] = (), base: str = REPORT_FILE) -> dict[str, Any]:
    """Score every fold's held-out images under each variant, for each of ``methods`` (the shipped view on
    original bytes first, as the reference), and compare them: written per method to
    ``loso-variants.<method>.json`` beside ``base`` (the run's `train loso` report, ``loso.json`` unless it
    was written with --report). The fused verdict under each variant is compared too when there is something
    to fuse (``unseen``: name -> `eval` scores.csv with the same perturbations, or several methods): for
    ``base``'s fusion and each of ``reports`` (other `train loso --report` files of the same folds, e.g. one
    made without a detector), in ``loso-variants.fused.json``, and for one method also under ``fused`` in its
    own file."""
    from streamguard.evaluation import load_samples

    path = cfg.out / base
    if not path.is_file():
        written = sorted(p.name for p in cfg.out.glob("*.json") if not p.name.startswith("loso-variants."))
        raise FileNotFoundError(f"{path} is not there: name the run's `train loso --report` with --base-report "
                                f"(reports in {cfg.out}: {', '.join(written) or 'none'})")
    report = json.loads(path.read_text())
    # The sample, folds and pools the LOSO run used, as its report recorded them: planned again here, a run
    # made with --limit-per-group would be looked for under fold names it never had.
    seed = report.get("seed", cfg.seed)
    held = load_samples(cfg.loso_data, seed=seed, limit_per_group=report.get("limit_per_group"))
    pools: dict[str, str] = report.get("pools", {})
    folds = [Fold(f["name"], tuple(f["generators"]), tuple(f["sources"])) for f in report["folds"]]
    by_id = {s.id: s for s in held}
    limit = None
    if limit_per_group is not None:
        from streamguard.evaluation.datasets import subsample

        limit = {s.id for s in subsample([s for s in held if s.split != "test"], limit_per_group, seed)}
    thresholds = report["thresholds"]
    pooled: dict[str, dict[str, list[HeldOutScore]]] = {}
    results: dict[str, dict[str, Any]] = {}
    for method in methods:
        pooled[method] = {}
        for variant in [Variant(), *variants]:
            scores: list[HeldOutScore] = []
            for fold in folds:
                scores.extend(score_variant(settings, cfg, method, fold, variant, by_id, limit))
            pooled[method][variant.name] = scores
        results[method] = {
            "method": method, "limit_per_group": limit_per_group,
            "thresholds": {"ai_threshold": thresholds["ai_threshold"], "real_threshold": thresholds["real_threshold"]},
            **compare_variants(pooled[method], pools, thresholds["ai_threshold"], thresholds["real_threshold"])}
    fused: dict[str, Any] = {}
    if unseen or len(methods) > 1:
        logits = unseen_logits(unseen or {}, [v.name for v in variants])
        for name in (base, *reports):
            chosen = report if name == base else json.loads((cfg.out / name).read_text())
            fused[name] = {"weights": chosen["settings"]["fusion"]["weights"],
                           **fused_variants(pooled, logits, chosen, pools)}
        (cfg.out / "loso-variants.fused.json").write_text(json.dumps(
            {"methods": list(methods), "limit_per_group": limit_per_group, "reports": fused}, indent=2) + "\n")
    for method, result in results.items():
        if len(methods) == 1 and fused:
            result["fused"] = fused[base]
        (cfg.out / f"loso-variants.{method}.json").write_text(json.dumps(result, indent=2) + "\n")
    return {"methods": results, "fused": fused}

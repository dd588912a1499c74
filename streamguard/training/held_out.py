"""Per-image scores of the held-out groups of a training run, on their original bytes.

A run with ``--holdout-generator/--holdout-source`` writes them next to its weights (``held_out.json``);
leave-one-source-out validation pools them over folds to report per source and to choose fusion weights and
thresholds. Original bytes, not the training augmentation: the thresholds are for what the worker sees.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from streamguard.detectors.spec import Calibration
from streamguard.evaluation.datasets import Sample

HELD_OUT_FILE = "held_out.json"


@dataclass(frozen=True)
class HeldOutScore:
    """``logit`` is calibrated: the fusion hook averages exactly these."""

    id: str
    label: int
    generator: str
    source: str
    split: str
    logit: float

    @property
    def group(self) -> str:
        return self.generator if self.label == 1 else self.source


def held_out_scores(samples: Sequence[Sample], raw_logits: np.ndarray, calibration: Calibration) -> list[HeldOutScore]:
    return [HeldOutScore(s.id, s.label, s.generator, s.source, s.split, calibration.apply(float(z)))
            for s, z in zip(samples, raw_logits, strict=True)]


def save_held_out(out: Path, scores: Sequence[HeldOutScore], holdout: dict[str, list[str]], version: str,
                  name: str = HELD_OUT_FILE) -> Path:
    path = out / name
    payload = {"version": version, "holdout": holdout, "scores": [asdict(s) for s in scores]}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def load_held_out(out: Path) -> tuple[dict[str, list[str]], list[HeldOutScore]]:
    payload = json.loads((out / HELD_OUT_FILE).read_text())
    return payload["holdout"], [HeldOutScore(**row) for row in payload["scores"]]


def fold_folders(method_dir: Path) -> list[Path]:
    """The fold folders of a `train loso` method folder (``<out>/<method>``): those with held-out scores."""
    return sorted(d for d in method_dir.iterdir() if (d / HELD_OUT_FILE).is_file())


def variant_file(variant: str) -> str:
    """Where a fold keeps its held-out images scored under another view, perturbation or serving (a
    `streamguard train loso-variants` variant name, e.g. ``crops2`` or ``resize@jpeg75``)."""
    return f"held_out.{re.sub(r'[^A-Za-z0-9.-]+', '_', variant)}.json"


def load_variant_scores(out: Path, variant: str) -> list[HeldOutScore]:
    """The scores `variant_file` holds; `FileNotFoundError` when the variant was never scored there."""
    payload = json.loads((out / variant_file(variant)).read_text())
    return [HeldOutScore(**row) for row in payload["scores"]]

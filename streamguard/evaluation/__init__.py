"""The evaluation harness: labelled datasets in, the field's metrics and a report out.

- `datasets`: every common layout (CNNDetection, GenImage, AIGIBench, simple, CIFAKE tar, manifests)
  read into one list of `Sample`; bytes read on demand (`SampleReader`, `read_samples`).
- `runner`: scores samples through the worker's `Scorer` (one detector or the fused verdict), cached.
- `perturb`: robustness perturbations and the format/resolution normalization, bytes to bytes.
- `metrics`, `calibrate`: the numbers and the calibration fit; `harness` ties them together and
  `report` writes them out. ``streamguard eval`` and ``streamguard calibrate`` are thin over these.

From Python (training code)::

    from streamguard.config import load_settings
    from streamguard.evaluation import EvalConfig, EvalRunner, load_samples, read_samples, run_evaluation
    from streamguard.plugins import build_plugin_manager

    train = load_samples(["data/wild-train", "data/cifake-train.tar"], seed=0, split="train")
    for sample, data in read_samples(train):  # bytes read on demand, tar members included
        ...
    settings = load_settings()
    pm = build_plugin_manager(settings.plugins)
    with EvalRunner(settings, pm, "univfd", cache_dir=None) as runner:
        scored = runner.score(load_samples(["data/wild-train"], split="val"), "jpeg75")
    result = run_evaluation(EvalConfig(data=("data/wild-train",), detector="univfd"), settings, pm)
"""

from __future__ import annotations

import importlib
from typing import Any

# Re-exported lazily: importing the package (as ``streamguard eval``'s module does) must not pull in
# scikit-learn, scipy and matplotlib before a command needs them.
_EXPORTS = {
    "Sample": "datasets", "SampleReader": "datasets", "load_samples": "datasets", "read_samples": "datasets",
    "EvalConfig": "harness", "EvalResult": "harness", "run_evaluation": "harness",
    "FUSED": "runner", "EvalRunner": "runner", "ScoredSample": "runner",
    "write_report": "report",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)

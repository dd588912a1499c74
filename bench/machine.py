"""What every benchmark records beside its numbers: the machine, the versions, and the load around the run.

Other processes on the same cores slow torch far more than proportionally, so a result taken under load
must say so; `write` puts the record and the result in one JSON file."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch


def record(load_before: float) -> dict[str, Any]:
    """The machine and its load average from ``load_before`` (``os.getloadavg()[0]`` at the start) to now."""
    return {
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }


def write(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")

"""A re-score's progress, checkpointed to a local JSON file so that a killed run carries on.

The invariant: a cursor's ``next`` is written only after everything before it was published and
acknowledged and the dedupe cache refreshed. A run killed at any moment therefore redoes at most the chunk
it was in, and never skips one.

Each cursor is a ``[next, end]`` pair: one per partition of a topic, or one ("files") over a dataset's
sorted file list. ``end`` is fixed when the run starts. The file also records the run's identity (what
was asked for) and the versions key of the models that re-judge: a rerun with other models or another
policy is a different run, refused unless restarted.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

STATE_FORMAT = 1


class StateMismatch(Exception):
    """The state file belongs to another run (other models, other data)."""


def job_id(job: dict[str, Any]) -> str:
    canonical = json.dumps(job, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass
class RunState:
    job: dict[str, Any]
    versions_key: str
    cursors: dict[str, list[int]]
    # Where each cursor began, for progress.
    start_cursors: dict[str, list[int]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    runs: int = 0

    @property
    def done(self) -> bool:
        return all(next_ >= end for next_, end in self.cursors.values())

    @property
    def total(self) -> int:
        return sum(end - start for start, end in self.start_cursors.values())

    @property
    def completed(self) -> int:
        return sum(next_ - self.start_cursors[name][0] for name, (next_, _) in self.cursors.items())

    def add_counts(self, counts: dict[str, int]) -> None:
        for name, n in counts.items():
            self.counts[name] = self.counts.get(name, 0) + n

    def to_json(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "job": self.job, "versions_key": self.versions_key,
                "cursors": self.cursors, "start_cursors": self.start_cursors, "counts": self.counts,
                "runs": self.runs, "done": self.done, "updated_at": datetime.now(UTC).isoformat()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunState:
        if data.get("format") != STATE_FORMAT:
            raise StateMismatch(f"state format {data.get('format')!r}, this version writes {STATE_FORMAT}")
        return cls(job=data["job"], versions_key=data["versions_key"],
                   cursors={k: list(v) for k, v in data["cursors"].items()},
                   start_cursors={k: list(v) for k, v in data["start_cursors"].items()},
                   counts=dict(data.get("counts", {})), runs=int(data.get("runs", 0)))


class StateFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self, job: dict[str, Any], versions_key: str) -> RunState | None:
        """The saved state of this run, None when there is none. Raises `StateMismatch` for another run's."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise StateMismatch(f"{self.path} is not a state file: {exc}") from None
        state = RunState.from_json(data)
        if job_id(state.job) != job_id(job):
            raise StateMismatch(f"{self.path} belongs to another re-score ({state.job})")
        if state.versions_key != versions_key:
            raise StateMismatch(
                f"the models or policy changed since this re-score started (versions {state.versions_key}, "
                f"now {versions_key})")
        return state

    def save(self, state: RunState) -> None:
        """Atomically: a kill mid-write leaves the previous checkpoint, never half of one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(state.to_json(), f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

"""The detectors a Triton repository can serve: the built-in CLIP-head detectors, read off the default
plugins (`streamguard.builtin.cliphead.builtin_detectors`), so a served model and the worker's
`DetectorSpec` are built from one description and can never disagree on the version.
"""

from __future__ import annotations

from streamguard.builtin.cliphead import ClipHeadDetector, builtin_detectors


def served_detectors() -> dict[str, ClipHeadDetector]:
    return builtin_detectors()


def served_detector(name: str) -> ClipHeadDetector:
    table = served_detectors()
    if name not in table:
        raise ValueError(f"no served detector {name!r}; known: {', '.join(table)}")
    return table[name]

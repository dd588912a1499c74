"""Test-only faults in the pipeline around the detectors, inert unless ``STREAMGUARD_TEST_FAULTS`` is set.

With it set, fusing the scores of one particular image raises `MemoryError`, as a real image can in a
plugin or in preparation: the image whose brightness is exactly `FAULT_GRAY` (a solid gray the tests
paint). The worker must dead-letter that image alone, with stage "detect", and judge the rest.
"""

from __future__ import annotations

import os

from streamguard import hookimpl

FAULT_GRAY = 13
_GAIN = 10.0
_FAULT_LOGIT = _GAIN * (FAULT_GRAY / 255.0 - 0.5)


@hookimpl(tryfirst=True)
def fuse_scores(scores, settings):  # type: ignore[no-untyped-def]
    if not os.environ.get("STREAMGUARD_TEST_FAULTS"):
        return None
    for score in scores:
        if score.detector == "brightness" and score.logit is not None and abs(score.logit - _FAULT_LOGIT) < 1e-3:
            raise MemoryError("test fault: fusing this image ran out of memory")
    return None  # firstresult: the real fusion decides

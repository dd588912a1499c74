"""Provenance-metadata detector: generator fingerprints in IPTC XMP, PNG text chunks and EXIF.

Unsigned metadata is one-sided evidence: a generator's fingerprint is worth flagging, but camera EXIF is
what anyone who wants an image cleared writes into it, so it is never a reason to call an image real. Only
a signed capture credential (the built-in `credentials` detector) can speak for a camera.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from streamguard import DetectorInput, DetectorSpec, LoadContext, hookimpl

# 1.1.0: camera EXIF no longer scores (it moved forged images toward real); cached verdicts re-score.
VERSION = "1.1.0"

_IPTC_AI = re.compile(r"digitalsourcetype/trainedAlgorithmicMedia\b", re.IGNORECASE)
_IPTC_PARTLY_AI = re.compile(
    r"digitalsourcetype/(compositeWithTrainedAlgorithmicMedia|algorithmicMedia)\b", re.IGNORECASE
)
_GENERATOR_NAMES = re.compile(
    r"stable[ -]?diffusion|midjourney|dall[-·e ]*e|novelai|adobe firefly|imagen|invokeai|comfyui|"
    r"automatic1111|fooocus|leonardo\.ai|nightcafe|dreamstudio|craiyon|dreamshaper",
    re.IGNORECASE,
)
_A1111_KEYS = ("Steps:", "Sampler:")


def score_metadata(metadata: Mapping[str, str]) -> float | None:
    """The raw logit for one image's metadata, or None when there is no evidence of generation."""
    xmp = metadata.get("xmp", "")
    if _IPTC_AI.search(xmp):
        return 6.0
    parameters = metadata.get("info.parameters", "")
    if all(key in parameters for key in _A1111_KEYS):
        return 6.0
    for key in ("info.prompt", "info.workflow"):
        if '"class_type"' in metadata.get(key, ""):
            return 6.0
    text_fields = (v for k, v in metadata.items() if k.startswith("info.") or k == "exif.Software")
    if any(_GENERATOR_NAMES.search(value) for value in text_fields):
        return 5.0
    if _IPTC_PARTLY_AI.search(xmp):
        return 3.0
    # Camera Make/Model/DateTimeOriginal alone: abstain. Any negative logit here would let forged EXIF
    # clear a generated image.
    return None


class ProvenanceBackend:
    def predict(self, batch: Sequence[DetectorInput]) -> list[float | None]:
        return [score_metadata(item.image.metadata) for item in batch]

    def close(self) -> None:
        return None


def _load(ctx: LoadContext) -> ProvenanceBackend:
    return ProvenanceBackend()


@hookimpl
def register_detectors(register) -> None:  # type: ignore[no-untyped-def]
    register(
        DetectorSpec(
            name="provenance",
            version=VERSION,
            load=_load,
            contract=None,
            description="Generator fingerprints in metadata (IPTC, SD/ComfyUI text chunks, EXIF Software).",
        )
    )

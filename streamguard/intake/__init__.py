"""Image intake: bytes in, a normalised RGB image and each detector's input tensor out."""

from streamguard.intake.contract import (
    CLIP_MEAN,
    CLIP_STD,
    InputContract,
    aggregate_logits,
    decode_side,
    prepare,
    prepare_views,
)
from streamguard.intake.decode import DecodedImage, ImageHeader, decode_image, estimate_decoded_pixels, read_header

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DecodedImage",
    "InputContract",
    "aggregate_logits",
    "decode_image",
    "decode_side",
    "estimate_decoded_pixels",
    "ImageHeader",
    "read_header",
    "prepare",
    "prepare_views",
]

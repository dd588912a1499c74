"""Errors of the CLIP backbone. None of them is about one input image, so none is a ``StreamguardError``
(those turn an input into a dead letter); they stop a detector from loading instead."""

from __future__ import annotations

FETCH_COMMAND = "streamguard backbone fetch"


class BackboneError(RuntimeError):
    """The CLIP image encoder cannot be provided."""


class BackboneMissing(BackboneError):
    """The converted weights are not in the cache. The message names the command that makes them."""


class BackboneCorrupt(BackboneMissing):
    """The cache exists but does not match its manifest (checksum, unreadable file, wrong shapes).

    A subclass of ``BackboneMissing``: for a caller both mean "no usable cache, run the fetch command".
    """


class CheckpointError(BackboneError):
    """An operator-supplied checkpoint (``backbone.checkpoint``) cannot be read as a CLIP ViT image tower."""


class ConversionError(BackboneError):
    """The upstream ONNX file could not be turned into verified float weights."""

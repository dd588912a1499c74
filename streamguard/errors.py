"""Typed errors. Each names the pipeline stage it belongs to, which becomes the dead letter's ``stage``."""

from __future__ import annotations

from typing import ClassVar


class StreamguardError(Exception):
    """Base of every error that turns an input into a dead letter instead of a verdict."""

    stage: ClassVar[str] = "process"

    @property
    def error_type(self) -> str:
        return type(self).__name__


class SchemaError(StreamguardError):
    """The record is not a valid event: bad JSON, missing or invalid fields, unknown schema version."""

    stage = "parse"


class IntakeError(StreamguardError):
    """The bytes are not an image streamguard can judge."""

    stage = "decode"


class UnsupportedFormat(IntakeError):
    """Not an image, or an image format outside the configured allow-list."""


class CorruptImage(IntakeError):
    """Recognised as an image but cannot be decoded (truncated, damaged)."""


class EmptyImage(CorruptImage):
    """Zero bytes."""


class TooLarge(IntakeError):
    """Over the byte or pixel limit (a decompression bomb is one of these)."""


class UnsupportedGeometry(IntakeError):
    """A shape no detector can judge: a long side over ``intake.max_aspect_ratio`` times the short side (a
    1x100000 strip is a few hundred bytes, yet resizing its short side to 224 would need gigabytes)."""


class FetchError(StreamguardError):
    """The image named by an event's URI could not be fetched."""

    stage = "fetch"


class FetchRefused(FetchError):
    """The URI points at an address streamguard must not reach (loopback, private, link-local, ...)."""


class FetchFailed(FetchError):
    """Unreachable host, timeout, TLS failure, or an HTTP error status."""


class FetchTooLarge(FetchError):
    """The response exceeded the byte limit."""


class TooManyRedirects(FetchError):
    """More redirects than the configured limit."""


class RecordTooLarge(StreamguardError):
    """The Kafka record itself is over the worker's size limit."""

    stage = "parse"


class UnreadableRecord(StreamguardError):
    """The Kafka client could not read the record at all (a corrupt batch, a header key that is not UTF-8,
    a compression codec it cannot decode): only its topic, partition and offset are known."""

    stage = "consume"


class HeadersTooLarge(StreamguardError):
    """The record's headers are over the worker's limit."""

    stage = "parse"


class InternalError(StreamguardError):
    """An unexpected failure while processing one record; it is dead-lettered, never retried forever.

    ``stage`` is the stage it happened in, so an operator can tell a decode bug from a detector crash."""

    def __init__(self, message: str, stage: str = "process") -> None:
        super().__init__(message)
        self.stage = stage  # type: ignore[misc]

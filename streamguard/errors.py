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

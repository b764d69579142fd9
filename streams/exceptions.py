"""Every error tidegate raises derives from `TidegateError`."""

from __future__ import annotations


class TidegateError(Exception):
    """Root of tidegate's exceptions."""


class ConfigurationError(TidegateError):
    """A setting or flag has a value tidegate cannot use."""


class QueueFull(TidegateError):
    """The path a request would take is past its lag cap: retry after `retry_after_ms`.

    Raised by the client before anything is sent, so the caller can back off at once.
    """

    def __init__(self, stage: str, lag: int, cap: int, retry_after_ms: int) -> None:
        super().__init__(f"queue full at stage {stage!r}: lag {lag} against cap {cap}; retry after {retry_after_ms} ms")
        self.stage = stage
        self.lag = lag
        self.cap = cap
        self.retry_after_ms = retry_after_ms


class ReplyTimeout(TidegateError):
    """No reply arrived for a request before its deadline."""

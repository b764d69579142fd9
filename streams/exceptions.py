"""The errors a caller of the Kafka layer and the client sees; all are `TidegateError`s."""

from __future__ import annotations

from schemas.exceptions import TidegateError

__all__ = ["QueueFull", "ReplyTimeout", "RequestTooLarge", "TidegateError"]


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


class SendTimeout(ReplyTimeout):
    """The broker did not acknowledge the request before its deadline: it was not
    accepted as far as the caller knows (if it still lands, it is answered `expired`)."""


class RequestTooLarge(TidegateError):
    """The broker refuses a record this large: the request was not sent (a shorter
    prompt, or fewer messages, will go)."""

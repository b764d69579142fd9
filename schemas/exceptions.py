"""tidegate's root exception, and the codec's own error.

The root lives here, in the lowest layer, so that every package (each of which
may import schemas/) derives its errors from one class: a caller catches
`TidegateError` and gets every error tidegate raises.
"""

from __future__ import annotations


class TidegateError(Exception):
    """Root of tidegate's exceptions."""


class SerializationError(TidegateError, ValueError):
    """A message could not be encoded or decoded; the message says which schema and why."""

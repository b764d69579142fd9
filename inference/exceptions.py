"""Errors of the inference stage."""

from streams.exceptions import TidegateError


class ModelError(TidegateError):
    """A model could not be found, loaded or run; the message names it."""

"""Errors of the conversation layer."""

from schemas.exceptions import TidegateError


class ModelError(TidegateError):
    """A model could not be found, loaded or run; the message names it."""

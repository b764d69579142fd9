"""Errors of the inference stage: a model error is raised where its files are found
(conversation/model_files.py) as well as where it runs."""

from conversation.exceptions import ModelError

__all__ = ["ModelError"]

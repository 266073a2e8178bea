"""Errors the engine raises for bad requests; the server maps them to OpenAI-style HTTP errors."""
from __future__ import annotations


class EmberError(Exception):
    """Base class of Ember's own errors."""


class InvalidRequestError(EmberError):
    """A request the engine cannot run as asked; `param` names the offending field when there is one."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class ContextLengthError(InvalidRequestError):
    """The prompt (plus the tokens asked for) does not fit the model's context."""


class CheckpointError(EmberError, ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file and the problem."""


class EngineDeadError(EmberError):
    """The engine's background loop has stopped; no request can be served."""

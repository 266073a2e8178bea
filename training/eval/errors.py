"""Errors of the evaluation package; each message says what is wrong and where."""
from __future__ import annotations

import os


class EvalError(ValueError):
    """Base class: a problem the user can fix (bad data, a server that cannot score, a bad option)."""


class DataError(EvalError):
    """A data file that cannot be used; the message names the file and, when known, the line."""

    def __init__(self, path: str | os.PathLike, message: str, line: int | None = None):
        self.path = str(path)
        self.line = line
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


class ServerError(EvalError):
    """A server that answered, but not with what scoring needs (no prompt logprobs, an error body, ...)."""

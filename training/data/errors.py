"""The one error type of the data pipeline: bad input or bad settings, named precisely."""
from __future__ import annotations


class DataError(ValueError):
    """Input data or settings the pipeline cannot use; the message names the file (and line) at fault."""

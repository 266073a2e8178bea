"""Choosing between a Triton kernel and its torch reference.

Triton runs only on CUDA tensors and only when the `triton` package is importable; the
environment variable EMBER_DISABLE_TRITON=1 forces the torch references everywhere (useful to
bisect a numerical difference or to run on a GPU without a working Triton).
"""
from __future__ import annotations

import functools
import importlib.util

import torch

from engine.config import env_switch


@functools.cache
def triton_available() -> bool:
    """True when the `triton` package can be imported (checked once per process)."""
    return importlib.util.find_spec("triton") is not None


def triton_disabled() -> bool:
    """True when EMBER_DISABLE_TRITON asks for the torch references (1/true/yes/on; engine.config.env_switch)."""
    return env_switch("EMBER_DISABLE_TRITON") is True


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether a dispatcher should launch Triton for these tensors."""
    if triton_disabled() or not triton_available():
        return False
    return all(t.is_cuda for t in tensors)

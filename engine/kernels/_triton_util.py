"""Small helpers shared by the Triton launchers (imported only where Triton is available)."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Under the CPU interpreter each autotune config would be run for real: keep one config there.
INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"

LOG2E = 1.4426950408889634


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (a tiny fp32 model must match its torch path); else tf32 is moot."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (a small stand-in on the CPU interpreter)."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def pick_configs(configs: list) -> list:
    """A list of launch configs (an autotune list, or a sweep's), cut to its first entry under the interpreter."""
    return configs[:1] if INTERPRET else configs


__all__ = ["INTERPRET", "LOG2E", "dot_precision", "num_sms", "pick_configs", "tl", "triton"]

"""Small helpers shared by the Triton launchers (imported only where Triton is available)."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from engine.config import env_switch

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


@functools.cache
def _pdl_device(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9 and env_switch("EMBER_PDL") is not False


@functools.cache
def _trigger_override() -> str:
    return os.environ.get("EMBER_PDL_TRIGGER", "")


def pdl_launch(device: torch.device, early_trigger: bool = True) -> dict:
    """Launch arguments for a kernel that starts with `wait_for_inputs(PDL)`.

    On Hopper and newer GPUs the kernel is launched with programmatic dependent launch: its programs
    may start while the previous kernel in the stream is still running (its prologue, and any
    loads of constant inputs placed before the wait, overlap that kernel's tail), and inside CUDA
    graphs the launch gap between the two shrinks. On by default (measurements in
    benchmarks/NOTES.md); EMBER_PDL=0 turns it off (read once per process); the interpreter and older
    GPUs always launch normally.

    early_trigger: the kernel lets the next one launch as soon as all its programs have started
    (small kernels: the next kernel's programs then spread over the idle SMs); otherwise only as its
    programs exit (GEMVs filling the GPU: a next kernel placed early would land on the SMs that
    happen to free up first, unevenly). EMBER_PDL_TRIGGER=early|exit overrides (measurements).
    """
    on = device.type == "cuda" and not INTERPRET and _pdl_device(
        device.index if device.index is not None else torch.cuda.current_device())
    if not on:
        return {"PDL": 0}
    override = _trigger_override()
    early = early_trigger if override not in ("early", "exit") else override == "early"
    return {"PDL": 1 if early else 2, "launch_pdl": True}


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """Under programmatic dependent launch (PDL 1 or 2, see pdl_launch): block until the previous
    kernel has finished and its writes are visible; with PDL 1, then let the next kernel launch
    (with 2 it launches as this kernel's programs exit).

    Everything a kernel reads that an earlier kernel may have written, and everything it writes,
    must come after this call: a write before it could land in memory that the previous kernel is
    still reading. Only inputs that no kernel writes (weights) may be loaded before it. Since every
    such kernel waits before it finishes, the wait also covers all kernels further back.
    """
    if PDL:
        gdc_wait()
    if PDL == 1:
        gdc_launch_dependents()


__all__ = ["INTERPRET", "LOG2E", "dot_precision", "num_sms", "pdl_launch", "pick_configs", "tl", "triton",
           "wait_for_inputs"]

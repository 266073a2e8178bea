"""Launch configurations of the weight-only matmuls: measured winners first, heuristics second.

tile_config(m, n, k, bits, group) looks the call up, by (bits, group, M bucket, K, N), in
  0. entries installed in this process with register_tuned() (a running benchmark sweep),
  1. the JSON file named by EMBER_QUANT_TUNING, when set (a benchmark sweep writes one), then
  2. TUNED in quant_tuned.py (winners measured on the GPU, committed with the date and card),
and falls back to default_config(). Shapes not in a table borrow the entry of the nearest shape
with the same bits, group and M bucket when K and N are both within a factor of two.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from functools import lru_cache

DEQUANT_MIN_M = 1024  # from here on: dequantize once, then cuBLAS (compute-bound)
KERNELS = ("gemv", "gemv_h2", "dot", "mma", "dequant")


@dataclass(frozen=True)
class TileConfig:
    """Launch shape of one quantized matmul call; benchmarks and tests may pass their own.

    kernel: "gemv" (CUDA-core FMA, small M), "gemv_h2" (int4 / int8 GEMV on packed fp16 pairs,
    one activation row a program; CUDA only, runs as "gemv" elsewhere or when K does not fit
    its step (int8: K % 64); block_m, block_k unused, prefetch as below), "dot" (tensor cores),
    "mma" (int4 on tensor cores with the packed tile staged by the pipeliner, quant_mma_triton.py;
    int8 runs as "dot"; prefetch, block_k unused) or "dequant" (cuBLAS).
    split_k: K slices per output tile (None: enough programs for `waves` per SM, each slice at
    least `min_steps` steps long). prefetch: 2 keeps a two-step register ring of weights and
    scales, 0 loads each step where it is used ("gemv_h2": the ring's depth, 2 or 3). block_k: int8
    columns per step. w_is_a ("mma"): W is the matrix unit's A operand (out^T = W x^T, wgmma on
    Hopper) instead of B.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    split_k: int | None = None
    kernel: str = "dot"
    prefetch: int = 2
    block_k: int = 128
    waves: int = 4
    min_steps: int = 2
    w_is_a: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TileConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def m_bucket(m: int) -> int:
    """Power of two at or above m (the key tuned entries are stored under)."""
    return 1 << max(0, math.ceil(math.log2(max(m, 1))))


def default_config(m: int, bits: int = 4) -> TileConfig:
    """Heuristic launch shape, used where no measured entry applies (shapes checked offline for
    register spills with ptxas for sm_90)."""
    if m >= DEQUANT_MIN_M:
        return TileConfig(128, 128, 8, 3, kernel="dequant")
    # The CUDA-core GEMV pays 1 FFMA a code per activation row: from 2 rows (int4) or 4 (int8) on,
    # the tensor-core kernel needs fewer instructions a byte (sass_report.py: int4 M=2 14.6 vs 6.5).
    if bits == 4 and m == 1:
        return TileConfig(1, 128, 4, 1, kernel="gemv")
    if bits == 8 and m <= 2:
        return TileConfig(m, 64, 4, 1, kernel="gemv")
    if m <= 16:
        return TileConfig(16, 128, 8, 3) if bits == 4 else TileConfig(16, 64, 4, 4)
    if m <= 64 or bits == 4:
        return TileConfig(64, 128, 8, 3) if bits == 4 else TileConfig(64, 64, 4, 3)
    return TileConfig(128, 128, 8, 3)


def _key(bits: int, group: int | None, m: int, k: int, n: int) -> str:
    return f"int{bits}/g{group or 0}/m{m_bucket(m)}/k{k}/n{n}"


def _parse(entries: dict) -> dict[str, TileConfig]:
    return {key: TileConfig.from_dict(cfg) for key, cfg in entries.items()}


_REGISTERED: dict[str, TileConfig] = {}


def register_tuned(entries: dict[str, TileConfig]) -> None:
    """Install measured winners for this process, ahead of every table (benchmark sweeps)."""
    _REGISTERED.update(entries)
    _MEMO.clear()


_MEMO: dict[tuple, TileConfig] = {}  # lookups are per call on the eager path: keep them O(1)


@lru_cache(maxsize=None)
def _tables(env_path: str | None) -> list[dict[str, TileConfig]]:
    from engine.kernels.quant_tuned import TUNED

    tables = [_REGISTERED]
    if env_path:
        with open(env_path) as f:
            tables.append(_parse(json.load(f)["entries"]))
    tables.append(_parse(TUNED))
    return tables


def _nearest(table: dict[str, TileConfig], bits: int, group: int | None, m: int, k: int, n: int):
    prefix = f"int{bits}/g{group or 0}/m{m_bucket(m)}/"
    best, best_d = None, None
    for key, cfg in table.items():
        if not key.startswith(prefix):
            continue
        kk, nn = (int(part[1:]) for part in key[len(prefix):].split("/"))
        dk, dn = abs(math.log2(kk / k)), abs(math.log2(nn / n))
        if dk <= 1 and dn <= 1 and (best_d is None or dk + dn < best_d):
            best, best_d = cfg, dk + dn
    return best


def tile_config(m: int, n: int | None = None, k: int | None = None, bits: int = 4,
                group: int | None = None) -> TileConfig:
    """The launch shape for an [m, k] x [k, n] call (measured winner, else heuristic)."""
    if m >= DEQUANT_MIN_M or n is None or k is None:
        return default_config(m, bits)
    env = os.environ.get("EMBER_QUANT_TUNING") or None
    memo_key = (m_bucket(m) if m > 1 else m, n, k, bits, group, env)
    cfg = _MEMO.get(memo_key)
    if cfg is None:
        cfg = _MEMO[memo_key] = _lookup(m, n, k, bits, group, env)
    return cfg


def _lookup(m: int, n: int, k: int, bits: int, group: int | None, env: str | None) -> TileConfig:
    tables = _tables(env)
    for table in tables:
        cfg = table.get(_key(bits, group, m, k, n))
        if cfg is not None:
            return cfg
    for table in tables:
        cfg = _nearest(table, bits, group, m, k, n)
        if cfg is not None:
            return cfg
    return default_config(m, bits)


def tuning_key(bits: int, group: int | None, m: int, k: int, n: int) -> str:
    """The table key of a call (what a sweep writes its winner under)."""
    return _key(bits, group, m, k, n)

"""Kernel benchmarks on one GPU: weight-only int8/int4 matmul and paged decode attention.

Each figure is set against a baseline timed in the same run: cuBLAS bf16 F.linear and torch's
int4 kernel (torch._weight_int4pack_mm) for the matmuls, torch SDPA on contiguous KV for
attention, and two bandwidth ceilings: a device-to-device copy (eager dst.copy_(src) of 2 GiB,
bytes read + written, CUDA events, median) and a read-only streaming kernel. Every kernel is
timed as a CUDA graph that replays it over rotated input sets (together larger than L2), after
a warm-up that also runs Triton's autotuning; the figure is the median per-op time.

With --sweep, each quantized case also times a set of launch configurations (kernel family,
tiles, warps, prefetch, split-K), installs the winner for the rest of the run, and writes the
winners as a table (JSON for EMBER_QUANT_TUNING, and a quant_tuned.py to commit); the reported
int4/int8 times are then those of the default dispatch, which picks the winners. The decode
attention sweep times the autotune configurations and split counts on the large cases.

    python benchmarks/bench_kernels.py --out bench_kernels.json            # full run
    python benchmarks/bench_kernels.py --sweep --out bench_kernels.json    # + config sweeps
    python benchmarks/bench_kernels.py --only attention --out a.json
    TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --smoke --sweep --out /tmp/s.json   # CPU plumbing
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROTATE_BYTES = 256 << 20  # rotated inputs per measurement: > 4x the H200's 60 MB L2
MAX_COPIES = 64
CLOCK = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - CLOCK:6.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def time_per_op(fns: list[Callable[[], object]], repeats: int) -> float:
    """Median milliseconds per call of one op over its rotated input sets (CUDA graph replay)."""
    for f in fns:  # warm-up: compiles, autotunes, fills allocator pools
        f()
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        for f in fns:
            f()
        return (time.perf_counter() - t0) * 1e3 / len(fns)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(repeats):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / len(fns))
    return statistics.median(samples)


def time_eager(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of one eager call, CUDA events around each (for long ops)."""
    for _ in range(3):
        fn()
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def copies_for(nbytes: int) -> int:
    return max(2, min(MAX_COPIES, math.ceil(ROTATE_BYTES / max(nbytes, 1))))


# ---------------------------------------------------------------------------------------------
# Ceilings
# ---------------------------------------------------------------------------------------------

def ceilings(device: torch.device, repeats: int, nbytes: int) -> dict:
    """Bandwidth ceilings in TB/s: eager copy (read + write), the same copy in a CUDA graph, and a
    read-only streaming kernel. The eager copy is the reference the percentages use.

    (A 1 GiB copy replayed from a CUDA graph read 2.70 TB/s on the H200, against ~4.1 eager: the
    graph's memcpy node takes another path than the eager copy kernel. Kernels stay graph-timed;
    only the ceiling is taken eagerly.)
    """
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    src.uniform_(-1, 1)  # never time on zeros
    dst = torch.empty_like(src)
    res = {"copy_bytes_each_way": nbytes}
    ms = time_eager(lambda: dst.copy_(src), repeats)
    res["copy_TBps"] = 2 * nbytes / (ms * 1e-3) / 1e12
    res["copy_graph_TBps"] = 2 * nbytes / (time_per_op([lambda: dst.copy_(src)], repeats) * 1e-3) / 1e12
    del dst
    try:
        res["read_TBps"] = read_bandwidth(src, repeats)
    except Exception as exc:  # no Triton on this machine
        res["read_error"] = str(exc).splitlines()[0][:160]
    return res


def read_bandwidth(src: torch.Tensor, repeats: int) -> float:
    """A Triton kernel that reads `src` once in 16-byte loads (one int32 per program written)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _read(ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK * ITERS + tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], tl.int32)
        for i in range(ITERS):
            acc ^= tl.load(ptr + offs + i * BLOCK, mask=offs + i * BLOCK < n, other=0)
        tl.store(out_ptr + pid, tl.sum(acc, 0))

    words = src.view(torch.int32)
    n = words.numel()
    block, iters = 2048, 16
    grid = (triton.cdiv(n, block * iters),)
    out = torch.empty(grid[0], dtype=torch.int32, device=src.device)
    ms = time_eager(lambda: _read[grid](words, out, n, BLOCK=block, ITERS=iters, num_warps=8), repeats)
    return n * 4 / (ms * 1e-3) / 1e12


# ---------------------------------------------------------------------------------------------
# Quantized matmul
# ---------------------------------------------------------------------------------------------

def _int4pack_baseline(n: int, k: int, group: int, device):
    """torch's tinygemm int4 kernel on random codes: (packed weight, scales_and_zeros) or an error string."""
    try:
        raw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device)
        packed = torch._convert_weight_to_int4pack(raw, 8)
        sz = torch.randn(k // group, n, 2, device=device, dtype=torch.bfloat16) * 0.01
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        torch._weight_int4pack_mm(x, packed, group, sz)
        return packed, sz
    except Exception as exc:  # missing op or unsupported shape on this build
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def quant_candidates(bits: int, m: int) -> list:
    """Stage-1 launch shapes per (bits, M); stage 2 varies the split of the stage-1 winner."""
    from engine.kernels.quant_tuning import TileConfig as T

    gemv = dict(kernel="gemv")
    out = []
    if m == 1:
        if bits == 4:
            out += [T(1, 64, 4, 1, **gemv), T(1, 128, 4, 1, **gemv), T(1, 256, 8, 1, **gemv), T(1, 128, 8, 1, **gemv),
                    T(1, 64, 2, 1, **gemv), T(1, 128, 4, 1, prefetch=0, **gemv)]
            # Packed-half GEMV: 8 W rows a thread (BLOCK_N / (8 x warps)) amortize the activation
            # pairs best (4.5 instructions a byte), 4 rows leave more warps an SM (5.3). The first
            # sweep's winner was the smallest tile (64 rows, 2 warps): tiles of 1-2 warps, many
            # programs; waves near the blocks an SM holds by registers, then twice that.
            h2 = dict(kernel="gemv_h2")
            out += [T(1, 64, 2, 1, waves=2, **h2), T(1, 64, 2, 1, waves=8, **h2), T(1, 64, 2, 1, waves=3, **h2),
                    T(1, 64, 2, 1, waves=6, **h2), T(1, 32, 1, 1, waves=6, **h2), T(1, 32, 1, 1, waves=12, **h2),
                    T(1, 64, 1, 1, waves=4, **h2), T(1, 64, 1, 1, waves=8, **h2), T(1, 128, 2, 1, waves=3, **h2),
                    T(1, 128, 2, 1, waves=6, **h2), T(1, 256, 4, 1, waves=3, **h2), T(1, 128, 4, 1, waves=4, **h2)]
            # A three-step ring (prefetch=3): more bytes in flight a program at ~168 registers.
            out += [T(1, 64, 2, 1, waves=6, prefetch=3, **h2), T(1, 64, 2, 1, waves=8, prefetch=3, **h2),
                    T(1, 128, 4, 1, waves=4, prefetch=3, **h2), T(1, 32, 1, 1, waves=8, prefetch=3, **h2)]
        else:
            out += [T(1, 64, 4, 1, **gemv), T(1, 128, 4, 1, **gemv), T(1, 64, 4, 1, block_k=256, **gemv),
                    T(1, 128, 8, 1, **gemv)]
            # int8 packed-half GEMV: 8 rows a thread (n256 w4, n128 w2, n64 w1) take 2.5
            # instructions a byte, 4 rows (n128 w4, n64 w2, n32 w1) 2.85 at fewer registers.
            h2 = dict(kernel="gemv_h2")
            out += [T(1, 128, 2, 1, waves=3, **h2), T(1, 128, 2, 1, waves=6, **h2), T(1, 256, 4, 1, waves=3, **h2),
                    T(1, 64, 1, 1, waves=4, **h2), T(1, 64, 1, 1, waves=8, **h2), T(1, 64, 2, 1, waves=4, **h2),
                    T(1, 64, 2, 1, waves=8, **h2), T(1, 32, 1, 1, waves=8, **h2), T(1, 128, 4, 1, waves=4, **h2),
                    T(1, 64, 1, 1, waves=8, prefetch=3, **h2), T(1, 128, 2, 1, waves=6, prefetch=3, **h2)]
    elif m <= 4:  # four activation rows: wider tiles spill registers
        out += [T(4, 64, 4, 1, **gemv), T(4, 128, 8, 1, **gemv)]
    if m <= 16:
        if bits == 4:
            out += [T(16, 64, 4, 3), T(16, 128, 4, 3), T(16, 128, 8, 3), T(16, 256, 8, 3),
                    T(16, 64, 4, 3, prefetch=0)]
            # "mma": the packed tile staged by the pipeliner. W as mma.sync's B operand (5.4
            # instructions a byte at 16 x 128, 4 warps) or wgmma's A (5.8); 4 warps at BLOCK_M 16
            # (with 8, a plane's activation tile is 2 bytes a thread: not cp.async-able).
            mma = dict(kernel="mma")
            out += [] if m == 1 else [T(16, 128, 4, 3, **mma), T(16, 128, 4, 4, **mma), T(16, 64, 4, 4, **mma),
                    T(16, 64, 4, 6, waves=8, **mma), T(16, 128, 4, 3, waves=2, **mma),
                    T(16, 128, 4, 3, w_is_a=True, **mma), T(16, 64, 4, 4, w_is_a=True, **mma),
                    T(16, 256, 4, 3, **mma)]
        else:
            out += [T(16, 64, 4, 4), T(16, 128, 8, 4), T(16, 64, 4, 4, block_k=256)]
            if m > 4:
                out += [T(16, 128, 4, 3)]
    else:
        if bits == 4:
            out += [T(64, 64, 4, 3), T(64, 128, 8, 3), T(32, 128, 4, 3), T(64, 64, 4, 4)]
            # "mma" at M = 64: W as wgmma's A operand (sass_report: 6.5 instructions a byte at
            # 64 x 128, 4 warps); W as B with BLOCK_M 64 makes Triton stage the unpacked tile in
            # shared memory for wgmma, so only BLOCK_M 32 there.
            mma = dict(kernel="mma", w_is_a=True)
            out += [T(64, 128, 4, 3, **mma), T(64, 64, 4, 4, **mma), T(64, 128, 4, 4, waves=2, **mma),
                    T(64, 128, 8, 3, **mma), T(64, 256, 8, 3, **mma), T(32, 128, 4, 3, kernel="mma"),
                    T(32, 64, 4, 4, kernel="mma")]
        else:
            out += [T(64, 64, 4, 4), T(64, 128, 4, 3), T(64, 128, 8, 3)]
    return out


def bench_quant(device, dtype, ms_list, shapes, group, repeats, sweep, deadline, rows: list, save,
                sweep_bits: tuple[int, ...] = (8, 4)) -> dict:
    """Append one row per (shape, M) to `rows` (saving after each); returns the sweep's winners."""
    from dataclasses import replace

    from engine.kernels.quant_matmul import quantize_int4, quantize_int8
    from engine.kernels.quant_matmul_triton import quant_matmul_triton
    from engine.kernels.quant_tuning import register_tuned, tile_config, tuning_key

    tuned = {}
    for k, n in shapes:
        w = torch.randn(n, k, device=device) * 0.02
        dense = w.to(dtype)
        q8, s8 = quantize_int8(w, dtype)
        q4, s4 = quantize_int4(w, group, dtype)
        del w
        base4 = _int4pack_baseline(n, k, group, device) if device.type == "cuda" else "cpu run"
        sets = {
            "bf16": (dense.numel() * dense.element_size(), copies_for(dense.numel() * 2)),
            "int8": (q8.numel() + s8.numel() * 2, copies_for(q8.numel())),
            "int4": (q4.numel() + s4.numel() * 2, copies_for(q4.numel())),
        }
        # Rotated weight copies; activations are tiny and shared.
        dense_c = [dense] + [dense.clone() for _ in range(sets["bf16"][1] - 1)]
        q_c = {8: [(q8, s8)] + [(q8.clone(), s8.clone()) for _ in range(sets["int8"][1] - 1)],
               4: [(q4, s4)] + [(q4.clone(), s4.clone()) for _ in range(sets["int4"][1] - 1)]}
        p4_c = None
        if not isinstance(base4, str):
            p4_c = [base4] + [(base4[0].clone(), base4[1].clone()) for _ in range(sets["int4"][1] - 1)]
        for m in ms_list:
            x = torch.randn(m, k, device=device, dtype=dtype)
            io = (m * k + m * n) * 2
            row = {"K": k, "N": n, "M": m, "group_size": group}
            t = time_per_op([lambda wt=wt: F.linear(x, wt) for wt in dense_c], repeats)
            row["bf16_cublas_ms"] = t
            row["bf16_cublas_TBps"] = (sets["bf16"][0] + io) / t / 1e9
            for name, bits in (("int8", 8), ("int4", 4)):
                g = group if bits == 4 else None
                if sweep and bits in sweep_bits and time.perf_counter() < deadline:
                    trials = _sweep_case(x, q_c[bits], bits, m, repeats, quant_candidates(bits, m), deadline,
                                         quant_matmul_triton, replace)
                    row[f"{name}_sweep"] = trials
                    ok = [r for r in trials if "ms" in r]
                    if ok:
                        best = min(ok, key=lambda r: r["ms"])
                        cfg = best["_cfg"]
                        key = tuning_key(bits, g, m, k, n)
                        tuned[key] = cfg
                        register_tuned({key: cfg})
                    for r in trials:
                        r.pop("_cfg", None)
                cfg = tile_config(m, n, k, bits, g)
                row[f"{name}_config"] = cfg.to_dict()
                try:
                    t = time_per_op([lambda qs=qs: quant_matmul_triton(x, qs[0], qs[1], None, bits)
                                     for qs in q_c[bits]], repeats)
                except Exception as exc:  # keep the run going; the row says what failed
                    row[f"{name}_error"] = str(exc).splitlines()[0][:200]
                    t = float("nan")
                row[f"{name}_ms"] = t
                row[f"{name}_TBps"] = (sets[name][0] + io) / t / 1e9
                row[f"{name}_speedup_vs_bf16"] = row["bf16_cublas_ms"] / t
            if p4_c is not None and dtype == torch.bfloat16:
                t = time_per_op([lambda p=p: torch._weight_int4pack_mm(x, p[0], group, p[1]) for p in p4_c], repeats)
                row["torch_int4pack_ms"] = t
                row["torch_int4pack_speedup_vs_bf16"] = row["bf16_cublas_ms"] / t
            else:
                row["torch_int4pack_ms"] = None
                row["torch_int4pack_note"] = base4 if isinstance(base4, str) else "needs bf16"
            rows.append(row)
            _print_quant_row(row)
            save()
        del dense_c, q_c, p4_c
    return tuned


def _sweep_case(x, copies_, bits, m, repeats, candidates, deadline, matmul, replace) -> list[dict]:
    """Stage 1: every candidate at the default split; stage 2: the winner at other splits."""
    out = []

    def trial(cfg):
        if time.perf_counter() > deadline:
            return
        try:
            t = time_per_op([lambda qs=qs: matmul(x, qs[0], qs[1], None, bits, cfg) for qs in copies_],
                            max(10, repeats // 2))
            out.append({"config": cfg.to_dict(), "ms": t, "_cfg": cfg})
        except Exception as exc:  # out of registers / shared memory and the like
            out.append({"config": cfg.to_dict(), "error": str(exc).splitlines()[0][:160]})

    for cfg in candidates:
        trial(cfg)
    ok = [r for r in out if "ms" in r]
    if ok:
        best = min(ok, key=lambda r: r["ms"])["_cfg"]
        for waves in (1, 2, 8, 16):
            trial(replace(best, waves=waves))
        trial(replace(best, split_k=1))
    ok = [r for r in out if "ms" in r]
    if ok:
        best = min(ok, key=lambda r: r["ms"])
        c = best["config"]
        print(f"      sweep int{bits} M={m}: {len(ok)} configs, best {c['kernel']} {c['block_m']}x{c['block_n']} "
              f"w{c['num_warps']} s{c['num_stages']} pf{c['prefetch']} bk{c['block_k']} waves{c['waves']} "
              f"{'A ' if c.get('w_is_a') else ''}"
              f"split{c['split_k']} {best['ms'] * 1e3:.1f} us")
    return out


def _print_quant_row(r: dict) -> None:
    def us(v):
        return f"{v * 1e3:7.1f}" if v is not None else "    n/a"

    sp4 = r.get("torch_int4pack_speedup_vs_bf16")
    log(f"K={r['K']:5d} N={r['N']:5d} M={r['M']:3d} | bf16 {us(r['bf16_cublas_ms'])} us "
        f"{r['bf16_cublas_TBps']:4.2f} TB/s | int8 {us(r['int8_ms'])} us x{r['int8_speedup_vs_bf16']:4.2f} "
        f"{r['int8_TBps']:4.2f} TB/s | int4 {us(r['int4_ms'])} us x{r['int4_speedup_vs_bf16']:4.2f} "
        f"{r['int4_TBps']:4.2f} TB/s [{r['int4_config']['kernel']}] | torch int4 {us(r['torch_int4pack_ms'])} us "
        f"{'x%4.2f' % sp4 if sp4 else ''}")


def write_tuned(tuned: dict, path: Path, device_name: str, commit: str) -> None:
    """The sweep's winners: JSON (EMBER_QUANT_TUNING) and a quant_tuned.py ready to commit."""
    stamp = dt.date.today().isoformat()
    entries = {key: cfg.to_dict() for key, cfg in sorted(tuned.items())}
    path.write_text(json.dumps({"device": device_name, "date": stamp, "commit": commit, "entries": entries},
                               indent=1) + "\n")
    lines = ['"""Measured launch winners of the weight-only matmuls (see quant_tuning.py for the lookup).',
             "",
             f"Written by `benchmarks/bench_kernels.py --sweep` on {device_name}, {stamp}, commit {commit}.",
             '"""', "", "TUNED: dict[str, dict] = {"]
    for key, cfg in entries.items():
        lines.append(f"    {key!r}: {cfg!r},")
    lines.append("}")
    path.with_suffix(".py").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# Paged decode attention
# ---------------------------------------------------------------------------------------------

ATTN_SWEEP_CASES = ((32, 8192), (64, 8192), (64, 2048), (8, 8192), (64, 512), (32, 2048), (8, 2048),
                    (1, 8192), (1, 2048))


def bench_decode(device, dtype, batches, contexts, hq, hkv, d, page, repeats, copy_tbps, sweep,
                 deadline, rows: list, save) -> None:
    """Append one row per (batch, context) to `rows`, saving after each."""
    from engine.kernels._triton_util import num_sms
    from engine.kernels.paged_decode_triton import _CONFIGS, choose_num_splits, paged_decode_attention_triton

    elt = torch.empty((), dtype=dtype).element_size()
    for b in batches:
        for ctx in contexts:
            kv_bytes = 2 * b * ctx * hkv * d * elt
            io = 2 * b * hq * d * elt
            r = copies_for(kv_bytes)
            blocks_per_seq = ctx // page
            num_blocks = r * b * blocks_per_seq
            k_cache = torch.randn(num_blocks, page, hkv, d, device=device, dtype=dtype)
            v_cache = torch.randn_like(k_cache)
            # Each rotation reads a disjoint, shuffled set of blocks.
            perm = torch.randperm(num_blocks, device=device).to(torch.int32)
            tables = [perm[i * b * blocks_per_seq:(i + 1) * b * blocks_per_seq].view(b, blocks_per_seq)
                      for i in range(r)]
            lens = torch.full((b,), ctx, dtype=torch.int32, device=device)
            q = torch.randn(b, hq, d, device=device, dtype=dtype)
            scale = d ** -0.5
            splits = choose_num_splits(b, hkv, ctx, num_sms(device))
            row = {"batch": b, "context": ctx, "kv_bytes": kv_bytes, "num_splits": splits}

            def run(**kw):
                return time_per_op([lambda t=t: paged_decode_attention_triton(q, k_cache, v_cache, t, lens, scale,
                                                                              max_context_len=ctx, **kw)
                                    for t in tables], repeats)

            row["paged_ms"] = run()
            row["paged_TBps"] = (kv_bytes + io) / row["paged_ms"] / 1e9
            row["paged_nosplit_ms"] = run(num_splits=1)
            if sweep and (b, ctx) in ATTN_SWEEP_CASES and time.perf_counter() < deadline:
                trials = []
                for cfg in _CONFIGS:
                    for s in sorted({splits, max(1, splits // 2), 2 * splits, 4 * splits}):
                        if time.perf_counter() > deadline:
                            break
                        try:
                            trials.append({"config": cfg, "num_splits": s, "ms": run(num_splits=s, config=cfg)})
                        except Exception as exc:
                            trials.append({"config": cfg, "num_splits": s, "error": str(exc).splitlines()[0][:160]})
                row["sweep"] = trials
                ok = [t for t in trials if "ms" in t]
                if ok:
                    best = min(ok, key=lambda t: t["ms"])
                    print(f"      sweep B={b} ctx={ctx}: best {best['config']} splits={best['num_splits']} "
                          f"{best['ms'] * 1e3:.1f} us (default {row['paged_ms'] * 1e3:.1f} us)")
            del k_cache, v_cache
            # Baseline: SDPA on contiguous [B, H, L, D] KV, same bytes.
            kc = [torch.randn(b, hkv, ctx, d, device=device, dtype=dtype) for _ in range(r)]
            vc = [torch.randn_like(kc[0]) for _ in range(r)]
            q4 = q.view(b, hq, 1, d)
            try:
                torch.nn.functional.scaled_dot_product_attention(q4, kc[0], vc[0], enable_gqa=True)
                sdpa = [lambda i=i: F.scaled_dot_product_attention(q4, kc[i], vc[i], enable_gqa=True) for i in range(r)]
                row["sdpa_mode"] = "enable_gqa"
            except (TypeError, RuntimeError):
                g = hq // hkv
                sdpa = [lambda i=i: F.scaled_dot_product_attention(q4, kc[i].repeat_interleave(g, 1),
                                                                   vc[i].repeat_interleave(g, 1)) for i in range(r)]
                row["sdpa_mode"] = "expanded (includes the expand)"
            t2 = time_per_op(sdpa, repeats)
            del kc, vc
            row["sdpa_ms"] = t2
            row["sdpa_TBps"] = (kv_bytes + io) / t2 / 1e9
            row["paged_pct_of_copy"] = 100 * row["paged_TBps"] / copy_tbps
            row["sdpa_pct_of_copy"] = 100 * row["sdpa_TBps"] / copy_tbps
            row["paged_vs_sdpa"] = t2 / row["paged_ms"]
            rows.append(row)
            save()
            log(f"B={b:3d} ctx={ctx:5d} splits={splits:2d} | paged {row['paged_ms'] * 1e3:7.1f} us "
                f"{row['paged_TBps']:4.2f} TB/s {row['paged_pct_of_copy']:5.1f}% (no split "
                f"{row['paged_nosplit_ms'] * 1e3:7.1f} us) | SDPA {t2 * 1e3:7.1f} us {row['sdpa_TBps']:4.2f} TB/s "
                f"{row['sdpa_pct_of_copy']:5.1f}% | paged/SDPA speed x{row['paged_vs_sdpa']:4.2f}")


# ---------------------------------------------------------------------------------------------

def _commit() -> str:
    if os.environ.get("EMBER_COMMIT"):
        return os.environ["EMBER_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (set EMBER_COMMIT)"


def summary(report: dict) -> None:
    """The short table printed last."""
    c = report["ceilings"]
    print(f"\n== summary ({report['hardware']}, commit {report['commit'][:10]}) ==")
    print(f"copy {c['copy_TBps']:.2f} TB/s (graph-replayed copy {c['copy_graph_TBps']:.2f}), "
          f"read-only {c.get('read_TBps', float('nan')):.2f} TB/s")
    for r in report.get("quant_matmul", []):
        t4 = r.get("torch_int4pack_speedup_vs_bf16")
        print(f"K={r['K']:5d} N={r['N']:5d} M={r['M']:2d}  bf16 {r['bf16_cublas_ms'] * 1e3:6.1f}us  "
              f"int8 x{r['int8_speedup_vs_bf16']:4.2f} ({r['int8_config']['kernel']})  "
              f"int4 x{r['int4_speedup_vs_bf16']:4.2f} ({r['int4_config']['kernel']}, "
              f"{100 * r['int4_TBps'] / c['copy_TBps']:3.0f}% of copy)  "
              f"torch-int4 x{t4 if t4 else float('nan'):4.2f}")
    for r in report.get("decode_attention", []):
        print(f"B={r['batch']:2d} ctx={r['context']:5d}  paged {r['paged_ms'] * 1e3:7.1f}us "
              f"{r['paged_pct_of_copy']:5.1f}% of copy  SDPA {r['sdpa_ms'] * 1e3:7.1f}us  x{r['paged_vs_sdpa']:4.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON results path")
    p.add_argument("--only", choices=["quant", "attention", "all"], default="all")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--sweep", action="store_true", help="time launch configs; install and write the winners")
    p.add_argument("--tuned-out", help="where the sweep's quant table goes (default: quant_tuned.json beside --out)")
    p.add_argument("--budget-s", type=float, default=240.0,
                   help="sweeps stop starting new trials after this many seconds (the tables still complete)")
    p.add_argument("--shapes", default="", help="only these (K, N) of the chosen set, as K:N,K:N (default: all)")
    p.add_argument("--sweep-bits", default="8,4", help="which weight widths the sweep tunes (the others keep their "
                   "tables), e.g. 4")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter plumbing check)")
    p.add_argument("--model-shapes", action="store_true",
                   help="weight-only matmuls at M = 1 on the projections of the Llama-3.2-1B and Llama-3.1-8B "
                        "decode paths (fused q/k/v and gate/up, o, down, lm_head) instead of the fixed shapes")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("no CUDA device: run on a GPU, or pass --smoke under TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    global ROTATE_BYTES
    if args.smoke:
        dtype = torch.bfloat16 if cuda else torch.float16
        ms_list, shapes, batches, contexts = [1, 4], [(256, 128)], [1, 2], [64]
        heads, repeats = (8, 2, 64, 16), 1 if not cuda else args.repeats
        ROTATE_BYTES = 1 << 16
        copy_bytes = 1 << 20
    else:
        dtype = torch.bfloat16
        # Target shapes first: if the sweep budget runs out, the later cases keep their defaults.
        ms_list, shapes = [1, 16, 4, 64], [(4096, 14336), (14336, 4096), (4096, 4096)]
        if args.model_shapes:  # (K, N): 1B then 8B, each qkv, o, gate_up, down, lm_head
            ms_list = [1]
            shapes = [(2048, 3072), (2048, 2048), (2048, 16384), (8192, 2048), (2048, 128256),
                      (4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (4096, 128256)]
        if args.shapes:
            keep = {tuple(int(v) for v in kn.split(":")) for kn in args.shapes.split(",")}
            unknown = sorted(keep - set(shapes))
            if unknown:
                p.error(f"--shapes {unknown} not in this run's set: "
                        f"{','.join(f'{k}:{n}' for k, n in shapes)} (--model-shapes picks the decode set)")
            shapes = [kn for kn in shapes if kn in keep]
        batches, contexts = [1, 8, 32, 64], [512, 2048, 8192]
        heads, repeats = (32, 8, 128, 16), args.repeats
        copy_bytes = 2 << 30
    if args.smoke:
        global ATTN_SWEEP_CASES
        ATTN_SWEEP_CASES = ((2, 64),)
    torch.manual_seed(0)
    deadline = time.perf_counter() + args.budget_s
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    report = {
        "benchmark": "bench_kernels",
        "hardware": name,
        "sm_count": torch.cuda.get_device_properties(device).multi_processor_count if cuda else None,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "versions": {"torch": torch.__version__, "triton": _triton_version(), "cuda": torch.version.cuda},
        "settings": {"dtype": str(dtype), "repeats": repeats, "rotate_bytes": ROTATE_BYTES,
                     "timing": "CUDA graph over rotated inputs, median of repeats" if cuda else "wall clock",
                     "ceiling_timing": "eager, CUDA events, median", "group_size": args.group_size,
                     "smoke": args.smoke, "sweep": args.sweep, "model_shapes": args.model_shapes,
                     "command": " ".join(sys.argv)},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(report, indent=1) + "\n")

    report["ceilings"] = ceilings(device, 10 if cuda else 1, copy_bytes)
    copy_tbps = report["ceilings"]["copy_TBps"]
    report["copy_TBps"] = copy_tbps
    log(f"copy {copy_tbps:.2f} TB/s eager (graph-replayed {report['ceilings']['copy_graph_TBps']:.2f}), "
        f"read-only {report['ceilings'].get('read_TBps', float('nan')):.2f} TB/s")
    save()
    if args.only in ("quant", "all"):
        log("weight-only matmul (us per call; speedup vs cuBLAS bf16 in the same run)")
        quant_deadline = deadline - (0.3 * args.budget_s if args.only == "all" else 0)
        report["quant_matmul"] = []
        tuned = bench_quant(device, dtype, ms_list, shapes, args.group_size, repeats, args.sweep, quant_deadline,
                            report["quant_matmul"], save, tuple(int(b) for b in args.sweep_bits.split(",")))
        if args.sweep:
            path = Path(args.tuned_out) if args.tuned_out else out.with_name("quant_tuned.json")
            write_tuned(tuned, path, name, report["commit"])
            report["quant_tuned_path"] = str(path)
            log(f"wrote {len(tuned)} tuned entries to {path} and {path.with_suffix('.py')}")
        save()
    if args.only in ("attention", "all"):
        hq, hkv, d, page = heads
        log(f"paged decode attention, {hq} q heads / {hkv} kv heads / head dim {d}, page {page}")
        report["settings"].update({"q_heads": hq, "kv_heads": hkv, "head_dim": d, "page_size": page})
        report["decode_attention"] = []
        bench_decode(device, dtype, batches, contexts, hq, hkv, d, page, repeats, copy_tbps, args.sweep, deadline,
                     report["decode_attention"], save)
        save()
    log(f"wrote {out}")
    summary(report)
    return 0


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())

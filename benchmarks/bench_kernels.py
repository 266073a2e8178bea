"""Kernel benchmarks on one GPU: weight-only int8/int4 matmul and paged decode attention.

Each figure is set against a baseline timed in the same run: cuBLAS bf16 F.linear and torch's
int4 kernel (torch._weight_int4pack_mm) for the matmuls, torch SDPA on contiguous KV for
attention, and a device-to-device copy for bandwidth. Every op is timed as a CUDA graph that
replays it over R rotated input sets (together larger than L2), after a warm-up that also runs
Triton's autotuning; the figure is the median per-op time over repeats.

    python benchmarks/bench_kernels.py --out bench_kernels.json            # full run (H200: ~3 min)
    python benchmarks/bench_kernels.py --only attention --out a.json
    python benchmarks/bench_kernels.py --sweep --only quant --out s.json   # also try tile configs
    TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --smoke --out /tmp/s.json   # CPU plumbing check
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


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def time_per_op(fns: list[Callable[[], object]], repeats: int) -> float:
    """Median milliseconds per call of one op over its rotated input sets."""
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


def copies_for(nbytes: int) -> int:
    return max(2, min(MAX_COPIES, math.ceil(ROTATE_BYTES / max(nbytes, 1))))


def copy_bandwidth(device: torch.device, repeats: int, nbytes: int = 1 << 30) -> float:
    """Device copy bandwidth in TB/s (bytes read + written), the ceiling the kernels are set against."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_per_op([lambda: dst.copy_(src)], repeats)
    return 2 * nbytes / (ms * 1e-3) / 1e12


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


def bench_quant(device, dtype, ms_list, shapes, group, repeats, sweep) -> list[dict]:
    from engine.kernels.quant_matmul import quantize_int4, quantize_int8
    from engine.kernels.quant_matmul_triton import TileConfig, quant_matmul_triton, tile_config

    rows = []
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
        q8_c = [(q8, s8)] + [(q8.clone(), s8.clone()) for _ in range(sets["int8"][1] - 1)]
        q4_c = [(q4, s4)] + [(q4.clone(), s4.clone()) for _ in range(sets["int4"][1] - 1)]
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
            for name, copies_, bits in (("int8", q8_c, 8), ("int4", q4_c, 4)):
                t = time_per_op([lambda qs=qs: quant_matmul_triton(x, qs[0], qs[1], None, bits) for qs in copies_],
                                repeats)
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
            if sweep:
                row["int4_sweep"] = _sweep(x, q4_c, 4, m, repeats, TileConfig, tile_config, quant_matmul_triton)
                row["int8_sweep"] = _sweep(x, q8_c, 8, m, repeats, TileConfig, tile_config, quant_matmul_triton)
            rows.append(row)
            _print_quant_row(row)
        del dense_c, q8_c, q4_c, p4_c
    return rows


def _sweep(x, copies_, bits, m, repeats, TileConfig, tile_config, matmul) -> list[dict]:
    """A handful of tile shapes and split factors around the default, for tuning tile_config()."""
    base = tile_config(m)
    candidates = {base}
    for bn, warps, stages in ((32, 2, 4), (64, 4, 4), (128, 4, 3), (128, 8, 3), (64, 4, 6)):
        for split in (None, 1, 2, 4, 8):
            candidates.add(TileConfig(base.block_m, bn, warps, stages, split))
    out = []
    for cfg in sorted(candidates, key=str):
        try:
            t = time_per_op([lambda qs=qs: matmul(x, qs[0], qs[1], None, bits, cfg) for qs in copies_], repeats)
        except Exception as exc:  # out of shared memory and the like
            out.append({"config": cfg.__dict__, "error": str(exc).splitlines()[0][:120]})
            continue
        out.append({"config": cfg.__dict__, "ms": t})
    best = min((r for r in out if "ms" in r), key=lambda r: r["ms"], default=None)
    if best:
        print(f"      sweep int{bits} M={m}: best {best['config']} {best['ms'] * 1e3:.1f} us")
    return out


def _print_quant_row(r: dict) -> None:
    def us(v):
        return f"{v * 1e3:8.1f}" if v is not None else "     n/a"

    sp4 = r.get("torch_int4pack_speedup_vs_bf16")
    print(f"  K={r['K']:5d} N={r['N']:5d} M={r['M']:3d} | bf16 {us(r['bf16_cublas_ms'])} us "
          f"{r['bf16_cublas_TBps']:5.2f} TB/s | int8 {us(r['int8_ms'])} us x{r['int8_speedup_vs_bf16']:4.2f} "
          f"{r['int8_TBps']:5.2f} TB/s | int4 {us(r['int4_ms'])} us x{r['int4_speedup_vs_bf16']:4.2f} "
          f"{r['int4_TBps']:5.2f} TB/s | torch int4 {us(r['torch_int4pack_ms'])} us "
          f"{'x%4.2f' % sp4 if sp4 else ''}")


# ---------------------------------------------------------------------------------------------
# Paged decode attention
# ---------------------------------------------------------------------------------------------

def bench_decode(device, dtype, batches, contexts, hq, hkv, d, page, repeats, copy_tbps) -> list[dict]:
    from engine.kernels.paged_decode_triton import choose_num_splits, paged_decode_attention_triton
    from engine.kernels._triton_util import num_sms

    rows = []
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
            t = time_per_op([lambda t=t: paged_decode_attention_triton(q, k_cache, v_cache, t, lens, scale,
                                                                        max_context_len=ctx) for t in tables], repeats)
            row["paged_ms"] = t
            row["paged_TBps"] = (kv_bytes + io) / t / 1e9
            t1 = time_per_op([lambda t=t: paged_decode_attention_triton(q, k_cache, v_cache, t, lens, scale,
                                                                         num_splits=1) for t in tables], repeats)
            row["paged_nosplit_ms"] = t1
            del k_cache, v_cache
            # Baseline: SDPA on contiguous [B, H, L, D] KV, same bytes.
            rs = copies_for(kv_bytes)
            kc = [torch.randn(b, hkv, ctx, d, device=device, dtype=dtype) for _ in range(rs)]
            vc = [torch.randn_like(kc[0]) for _ in range(rs)]
            q4 = q.view(b, hq, 1, d)
            try:
                torch.nn.functional.scaled_dot_product_attention(q4, kc[0], vc[0], enable_gqa=True)
                sdpa = [lambda i=i: F.scaled_dot_product_attention(q4, kc[i], vc[i], enable_gqa=True) for i in range(rs)]
                row["sdpa_mode"] = "enable_gqa"
            except (TypeError, RuntimeError):
                g = hq // hkv
                sdpa = [lambda i=i: F.scaled_dot_product_attention(q4, kc[i].repeat_interleave(g, 1),
                                                                   vc[i].repeat_interleave(g, 1)) for i in range(rs)]
                row["sdpa_mode"] = "expanded (includes the expand)"
            t2 = time_per_op(sdpa, repeats)
            del kc, vc
            row["sdpa_ms"] = t2
            row["sdpa_TBps"] = (kv_bytes + io) / t2 / 1e9
            row["paged_pct_of_copy"] = 100 * row["paged_TBps"] / copy_tbps
            row["sdpa_pct_of_copy"] = 100 * row["sdpa_TBps"] / copy_tbps
            row["paged_vs_sdpa"] = t2 / row["paged_ms"]
            rows.append(row)
            print(f"  B={b:3d} ctx={ctx:5d} splits={splits:2d} | paged {row['paged_ms'] * 1e3:8.1f} us "
                  f"{row['paged_TBps']:5.2f} TB/s {row['paged_pct_of_copy']:5.1f}% (no split "
                  f"{t1 * 1e3:8.1f} us) | SDPA {t2 * 1e3:8.1f} us {row['sdpa_TBps']:5.2f} TB/s "
                  f"{row['sdpa_pct_of_copy']:5.1f}% | paged/SDPA speed x{row['paged_vs_sdpa']:4.2f}")
    return rows


# ---------------------------------------------------------------------------------------------

def _commit() -> str:
    if os.environ.get("EMBER_COMMIT"):
        return os.environ["EMBER_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (set EMBER_COMMIT)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON results path")
    p.add_argument("--only", choices=["quant", "attention", "all"], default="all")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--sweep", action="store_true", help="also time a few tile configs of the quantized matmuls")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter plumbing check)")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("no CUDA device: run on a GPU, or pass --smoke under TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    if args.smoke:
        dtype = torch.bfloat16 if cuda else torch.float16
        ms_list, shapes, batches, contexts = [1, 4], [(256, 128)], [1, 2], [64]
        heads, repeats = (8, 2, 64, 16), 1 if not cuda else args.repeats
        global ROTATE_BYTES
        ROTATE_BYTES = 1 << 16
    else:
        dtype = torch.bfloat16
        ms_list, shapes = [1, 4, 16, 64], [(4096, 4096), (4096, 14336), (14336, 4096)]
        batches, contexts = [1, 8, 32, 64], [512, 2048, 8192]
        heads, repeats = (32, 8, 128, 16), args.repeats
    torch.manual_seed(0)
    copy_tbps = copy_bandwidth(device, repeats, 1 << 30 if cuda else 1 << 20)
    print(f"device copy bandwidth: {copy_tbps:.2f} TB/s")
    report = {
        "benchmark": "bench_kernels",
        "hardware": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "sm_count": torch.cuda.get_device_properties(device).multi_processor_count if cuda else None,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "versions": {"torch": torch.__version__, "triton": _triton_version(), "cuda": torch.version.cuda},
        "settings": {"dtype": str(dtype), "repeats": repeats, "rotate_bytes": ROTATE_BYTES,
                     "timing": "CUDA graph over rotated inputs, median of repeats" if cuda else "wall clock",
                     "group_size": args.group_size, "smoke": args.smoke, "command": " ".join(sys.argv)},
        "copy_TBps": copy_tbps,
    }
    if args.only in ("quant", "all"):
        print("weight-only matmul (us per call; speedup vs cuBLAS bf16 in the same run)")
        report["quant_matmul"] = bench_quant(device, dtype, ms_list, shapes, args.group_size, repeats, args.sweep)
    if args.only in ("attention", "all"):
        hq, hkv, d, page = heads
        print(f"paged decode attention, {hq} q heads / {hkv} kv heads / head dim {d}, page {page}")
        report["decode_attention"] = bench_decode(device, dtype, batches, contexts, hq, hkv, d, page, repeats,
                                                  copy_tbps)
        report["settings"].update({"q_heads": hq, "kv_heads": hkv, "head_dim": d, "page_size": page})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())

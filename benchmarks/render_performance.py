"""Render the tables of docs/performance.md from the benchmark JSON files, so no figure is retyped.

Every JSON file in the results folder names its benchmark ("decode", "throughput", "bench_kernels");
the newest of each (by its "date") fills the block between `<!-- BEGIN name -->` and
`<!-- END name -->` in the document. Blocks whose JSON is missing are left as they are.

    python benchmarks/render_performance.py                      # benchmarks/results -> docs/performance.md
    python benchmarks/render_performance.py --results OUT --doc /tmp/performance.md --check
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fmt(x, digits: int = 1, suffix: str = "") -> str:
    return "-" if x is None else f"{x:,.{digits}f}{suffix}"


def provenance(d: dict) -> str:
    gpu = d.get("gpu") or d.get("hardware") or "?"
    command = d.get("command") or d.get("settings", {}).get("command") or "?"
    return f"Run {d.get('date', '?')}, commit `{d.get('commit') or '?'}`, {gpu}, torch {d.get('torch', d.get('versions', {}).get('torch', '?'))}. Command: `{command}`"


def render_decode(d: dict) -> str:
    s = d["settings"]
    lines = [provenance(d), "",
             f"Batch 1, prompt {s['prompt_len']} tokens, {s['output_len']} tokens out, greedy, ignore_eos; "
             f"copy bandwidth measured in the same run: **{d['copy_bandwidth_tbs']:.2f} TB/s**."
             + (" Overlapped decode on." if d["results"] and all(r.get("overlap_decode") for r in d["results"])
                else ""), "",
             "| model | weights | GB read / step | Ember tok/s | step ms | GPU step ms | roofline ms | % roofline "
             "| % roofline (GPU only) | eager tok/s | HF generate tok/s | Ember / HF |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by_key = {(r["model"], r["dtype"]): r for r in d["results"]}
    for r in d["results"]:
        hf = r.get("hf_tokens_per_s")
        lines.append(
            f"| {r['name']} | {r['dtype']} | {r['weight_gb'] + r['kv_mb_per_step'] / 1e3:.2f} | "
            f"**{fmt(r['tokens_per_s'])}** | {fmt(r['step_ms'], 3)} | {fmt(r.get('gpu_step_ms'), 3)} | "
            f"{fmt(r['roofline_ms'], 3)} | **{fmt(r['pct_roofline'], 0, '%')}** | {fmt(r.get('pct_roofline_gpu'), 0, '%')} | "
            f"{fmt(r.get('eager_tokens_per_s'))} | {fmt(hf)} | {fmt(r['tokens_per_s'] / hf if hf else None, 1, 'x')} |")
    notes = []
    for model in dict.fromkeys(r["model"] for r in d["results"]):
        bf16, int4 = by_key.get((model, "bf16")), by_key.get((model, "int4"))
        if bf16 and int4:
            notes.append(f"{bf16['name']}: int4 / bf16 = {int4['tokens_per_s'] / bf16['tokens_per_s']:.2f}x tokens/s")
    hf_tokens = s.get("hf_new_tokens") or {}
    if hf_tokens:
        notes.append("HF generate: " + ", ".join(f"{k} {v} new tokens" for k, v in hf_tokens.items())
                     + " (decode rate from the difference of a 1-token and an N-token call)")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


def render_throughput(d: dict) -> str:
    s = d["settings"]
    lines = [provenance(d), "",
             f"{s['num_requests']} requests, prompt lengths U[{s['prompt_len'][0]}, {s['prompt_len'][1]}], output "
             f"U[{s['output_len'][0]}, {s['output_len'][1]}], ignore_eos, greedy; max_num_seqs {s['max_num_seqs']}, "
             f"max_num_batched_tokens {s['max_num_batched_tokens']}, gpu_memory_utilization "
             f"{s['gpu_memory_utilization']}.", ""]
    batches = s.get("hf_batch_sizes") or []
    head = ("| model | Ember output tok/s | Ember total tok/s | seconds | steps (from graphs) | preemptions | KV tokens | "
            + " | ".join(f"HF batch {b}" for b in batches) + " | Ember / HF best |")
    lines += [head, "|" + "---|" * (8 + len(batches))]
    for r in d["results"]:
        e = r["ember"]
        hf = {h["batch"]: h for h in r.get("hf", [])}
        hf_cells = " | ".join(fmt(hf.get(b, {}).get("output_tokens_per_s"), 0) if "error" not in hf.get(b, {})
                              else hf[b]["error"] for b in batches)
        lines.append(f"| {r['name']} | **{fmt(e['output_tokens_per_s'], 0)}** | {fmt(e['total_tokens_per_s'], 0)} | "
                     f"{fmt(e['seconds'])} | {e['steps']} ({e.get('graph_steps', 0)}) | {e['preemptions']} | "
                     f"{e.get('kv_tokens', '-'):,} | {hf_cells} | **{fmt(r.get('speedup_vs_hf_best'), 1, 'x')}** |")
    return "\n".join(lines + ["", f"- {d.get('hf_note', '')}"])


def render_capture(docs: dict) -> str:
    lines = ["| run | model | weights | batch sizes captured | capture s | engine start s |", "|---|---|---|---|---|---|"]
    capture, start = [], []
    for r in docs.get("decode", {}).get("results", []):
        sizes = r.get("graph_batch_sizes") or []
        lines.append(f"| decode benchmark | {r['name']} | {r['dtype']} | {len(sizes)} (1..{sizes[-1] if sizes else '-'}) | "
                     f"{fmt(r['graph_capture_s'])} | {fmt(r.get('engine_init_s'))} |")
        capture.append(r["graph_capture_s"])
        start.append(r.get("engine_init_s") or 0.0)
    t = docs.get("throughput")
    if t:
        top = t["settings"]["max_num_seqs"]
        for r in t["results"]:
            e = r["ember"]
            lines.append(f"| throughput benchmark | {r['name']} | {r['dtype']} | 1..{top} | "
                         f"{fmt(e.get('graph_capture_s'))} | {fmt(e.get('engine_init_s'))} |")
            capture.append(e.get("graph_capture_s") or 0.0)
            start.append(e.get("engine_init_s") or 0.0)
    if capture:
        lines += ["", f"Capturing the decode graphs took {min(capture):.1f} to {max(capture):.1f} s in these runs; "
                      f"the whole engine start (KV sizing, prefill warm-up, capture) {min(start):.1f} to "
                      f"{max(start):.1f} s, model loading excluded."]
    return "\n".join(lines)


def render_kernels(d: dict) -> str:
    lines = [provenance(d), "", f"Copy bandwidth in the same run: {d['copy_TBps']:.2f} TB/s.", "",
             "| K x N | M | cuBLAS bf16 us | int8 us (speed-up) | int4 us (speed-up) | torch int4 us (speed-up) |",
             "|---|---|---|---|---|---|"]
    for q in d.get("quant_matmul", []):
        base = q["bf16_cublas_ms"]
        t4 = q.get("torch_int4pack_ms")
        lines.append(f"| {q['K']} x {q['N']} | {q['M']} | {base * 1e3:.1f} | {q['int8_ms'] * 1e3:.1f} "
                     f"({q['int8_speedup_vs_bf16']:.2f}x) | {q['int4_ms'] * 1e3:.1f} ({q['int4_speedup_vs_bf16']:.2f}x) | "
                     + (f"{t4 * 1e3:.1f} ({base / t4:.2f}x) |" if t4 else "- |"))
    lines += ["", "| batch x context | paged us | paged TB/s | % of copy | SDPA (contiguous) us | paged / SDPA speed |",
              "|---|---|---|---|---|---|"]
    for a in d.get("decode_attention", []):
        lines.append(f"| {a['batch']} x {a['context']} | {a['paged_ms'] * 1e3:.1f} | {a['paged_TBps']:.2f} | "
                     f"{a['paged_pct_of_copy']:.0f}% | {a['sdpa_ms'] * 1e3:.1f} | {a['paged_vs_sdpa']:.2f}x |")
    return "\n".join(lines)


def render_kernels_model_shapes(d: dict) -> str:
    """The weight-only table of a `--model-shapes` run (M = 1 on the decode projections, no attention)."""
    return render_kernels(d).split("\n\n| batch x context")[0]


def render_kernels_attention(d: dict) -> str:
    """The paged-decode table of an attention-only run (`bench_kernels.py --only attention`)."""
    return render_kernels(d).replace(
        "\n| K x N | M | cuBLAS bf16 us | int8 us (speed-up) | int4 us (speed-up) | torch int4 us (speed-up) |"
        "\n|---|---|---|---|---|---|\n", "")


def render_train(d: dict) -> str:
    return "\n".join([
        f"Run {d['date']}, commit `{d.get('commit') or '?'}`, {d['gpu']}, torch {d['torch']}. Command: "
        f"`python benchmarks/bench_train.py --config {d['config']}`", "",
        "| config | parameters | seq x micro-batch | compile | tokens/s | achieved TFLOP/s | MFU (datasheet 989.5) "
        "| vs bf16 matmul measured in the same run | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {d['config']} | {d['params'] / 1e6:,.0f}M | {d['seq_len']} x {d['micro_batch']} | {d['compile']} | "
        f"**{d['tokens_per_s']:,.0f}** | {d['achieved_tflops']:.0f} | {d['mfu_vs_datasheet'] * 100:.0f}% | "
        f"{d['ratio_vs_measured_matmul'] * 100:.0f}% of {d['matmul_tflops_measured']:.0f} | {d['max_memory_gib']:.1f} |"])


def render_multi_lora(d: dict) -> str:
    s = d["settings"]
    lines = [f"Run {d['date']}, commit `{d.get('commit') or '?'}`, {d['hardware']['gpu']}, torch "
             f"{d['hardware']['torch']}. Command: `python benchmarks/bench_multi_lora.py --shape {s['shape']}`", "",
             f"Random {s['shape']} shape, {s['dtype'].replace('torch.', '')}, batch {s['batch']}, prompt {s['prompt_len']}, "
             f"{s['output_len']} tokens out, rank {s['rank']} adapters on all seven projections; medians of "
             f"{s['repeats']} runs. Loading one adapter took {d['adapter_load_seconds_each'] * 1e3:.0f} ms."
             + (" Steps synchronous (per-step timing)." if s.get("step_breakdown", True) else
                " Engine as it serves (overlapped decode where it applies); decode step ms is the mean over the"
                " decode phase."), "",
             "| configuration | distinct adapters | output tokens/s | vs base (LoRA off) | decode tokens/s "
             "| decode vs base | decode step ms | decode graph GPU ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in d["results"]:  # ratios as the benchmark computed them (against its baseline run)
        m = r["median"]
        lines.append(f"| {r['name']} | {r['distinct_adapters']} | {m['output_tokens_per_s']:,.0f} | "
                     f"{r['ratio_vs_base']:.2f}x | {m['decode_tokens_per_s']:,.0f} | "
                     f"**{r['decode_ratio_vs_base']:.2f}x** | "
                     f"{m.get('decode_step_ms_median', m.get('decode_step_ms_mean')):.2f} | "
                     f"{fmt(r.get('gpu_step_ms'), 3)} |")
    return "\n".join(lines)


def render_attention_cpu(d: dict) -> str:
    s = d["settings"]
    lines = [provenance(d), "",
             f"One decode call, {s['dtype']}, heads {s['heads']} (Hq:Hkv:D), {s['threads']} torch thread(s), "
             f"best of {s['repeats']}; context lengths drawn uniformly from each range.", "",
             "| batch | contexts | per-sequence reference ms | batched by length ms | speed-up |", "|---|---|---|---|---|"]
    for r in d["rows"]:
        lines.append(f"| {r['batch']} | {r['context'][0]}-{r['context'][1]} | {r['reference_ms']:.3f} | "
                     f"{r['batched_ms']:.3f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def render_quant_cpu(d: dict) -> str:
    s = d["settings"]
    lines = [provenance(d), "",
             f"{s['dtype']}, int4 groups of {s['group_size']}, {s['threads']} torch thread(s), best of {s['repeats']}; "
             "ms per call. Packed: torch's row-by-row kernels; dequant + dense: the weight dequantized to the "
             "activations' dtype, then a dense matmul; reference: dequantized to fp32 every call. Bold: the way "
             "the dispatcher takes at that row count.", "",
             "| K x N | M | dense | int8 packed | int8 dequant + dense | int8 reference | int4 packed | "
             "int4 dequant + dense | int4 reference |", "|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        cells = []
        for bits in (8, 4):
            limit = d.get("dense_min_rows", {}).get(f"int{bits}")
            chosen = None if limit is None else "dequant_dense" if r["M"] >= limit else "packed"
            for way in ("packed", "dequant_dense", "reference"):
                v = f"{r[f'int{bits}_{way}_ms']:.3f}"
                cells.append(f"**{v}**" if way == chosen else v)
        lines.append(f"| {r['K']} x {r['N']} | {r['M']} | {r['dense_ms']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def newest(results: Path) -> dict[str, dict]:
    """The newest JSON of each benchmark kind in `results`."""
    found: dict[str, dict] = {}
    for path in sorted(results.glob("*.json")):
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        kind = {"bench_kernels": "kernels"}.get(d.get("benchmark"), d.get("benchmark"))
        shape = d.get("settings", {}).get("shape", "")
        if kind == "multi_lora" and shape not in ("", "llama-1b"):  # one table per model shape
            kind = f"multi_lora_{shape.rsplit('-', 1)[-1]}"
        if kind == "kernels" and not d.get("quant_matmul"):  # an attention-only run has its own table
            kind = "kernels_attention"
        if kind == "kernels" and "--model-shapes" in d.get("settings", {}).get("command", ""):
            kind = "kernels_model_shapes"
            if " --shapes " in d["settings"]["command"]:
                kind = "kernels_model_shapes_subset"  # some shapes only (an experiment's sweep): not the table
        if kind == "decode" and d.get("settings", {}).get("lm_head_bits") is not None:
            kind = "decode_quantized_head"  # a variant run (quoted in the text), not the table's
        if kind == "decode" and not d.get("settings", {}).get("hf_new_tokens", True):
            kind = "decode_variant"  # without the HF baseline (--no-hf): an A/B arm, quoted in the text
        if kind in ("decode", "kernels", "kernels_model_shapes") and "H100" in str(d.get("gpu") or d.get("hardware")):
            kind += "_h100"  # the targets are set on an H200; H100 runs get tables of their own
        if kind and (kind not in found or d.get("date", "") > found[kind].get("date", "")):
            found[kind] = d
    return found


def render(doc: str, docs: dict[str, dict]) -> str:
    blocks = {"decode": render_decode, "throughput": render_throughput, "kernels": render_kernels,
              "train_step": render_train, "multi_lora": render_multi_lora, "multi_lora_8b": render_multi_lora,
              "kernels_attention": render_kernels_attention, "decode_h100": render_decode,
              "kernels_h100": render_kernels, "kernels_model_shapes_h100": render_kernels_model_shapes,
              "attention_cpu": render_attention_cpu, "quant_cpu": render_quant_cpu}
    tables = {k: fn(docs[k]) for k, fn in blocks.items() if k in docs}
    if "decode" in docs or "throughput" in docs:
        tables["capture"] = render_capture(docs)
    for name, table in tables.items():
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(\n<!-- END {name} -->)", re.S)
        doc = pattern.sub(lambda m: m.group(1) + table + m.group(2), doc)
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "performance.md"))
    ap.add_argument("--check", action="store_true", help="print the rendered document instead of writing it")
    args = ap.parse_args(argv)
    docs = newest(Path(args.results))
    doc_path = Path(args.doc)
    text = render(doc_path.read_text(), docs)
    if args.check:
        print(text)
    else:
        doc_path.write_text(text)
        print(f"rendered {', '.join(sorted(docs)) or 'nothing'} into {doc_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

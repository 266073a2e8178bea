"""Fine-tuning cost on one GPU: peak memory and training tokens/s of full, LoRA, DoRA and QLoRA.

A random-weight Llama-3.2-1B-shaped model (1.24B parameters, 128k vocabulary, tied embeddings) trains
on random tokens through Ember's own step (training.trainer.Trainer: bf16 autocast, fused AdamW,
clipping). Each method runs in a fresh child process so its peak memory is its own. The baseline in
the same run is Hugging Face transformers (+ peft for LoRA) on the same shape, batch and optimizer.

    python benchmarks/bench_finetune.py --out bench_finetune.json                  # H200: ~4 min
    python benchmarks/bench_finetune.py --methods lora,qlora --seq-len 1024 --out x.json
    python benchmarks/bench_finetune.py --shape tiny --device cpu --steps 2 --out /tmp/f.json   # plumbing
    python benchmarks/bench_finetune.py --render benchmarks/results docs/performance.md          # the doc's table

Figures: tokens/s = batch x seq_len x steps / wall time of the measured steps (after warm-up, CUDA
synchronised); peak = torch.cuda.max_memory_allocated over the whole child (weights, optimizer state,
activations); the median over the measured steps is also reported per step.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    # Llama-3.2-1B: 16 layers, 2048 wide, GQA 32/8 heads, SwiGLU 8192, 128,256 tokens, tied embeddings.
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                     rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                 tie_word_embeddings=True),
}
METHODS = ("full", "lora", "dora", "qlora", "hf-full", "hf-lora")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------------
# One method, in a child process
# ---------------------------------------------------------------------------------------------

def random_model(shape: dict, dtype: torch.dtype, device: torch.device):
    """Ember's Transformer with N(0, 0.02) weights made directly on the device (no CPU init)."""
    from engine.config import ModelConfig
    from engine.model import RMSNorm, Transformer, rope_inv_freq

    config = ModelConfig(**shape)
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device=device)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif hasattr(module, "weight") and module.weight is not None and module.weight.dim() == 2:
                module.weight.normal_(0.0, 0.02)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(config).to(device)
    return model.to(dtype), config


def ember_setup(method: str, shape: dict, device: torch.device, args):
    from engine.lora import LoraConfig
    from training.finetune_config import QloraSection
    from training.finetune_model import apply_method, base_dtype, count_params

    dtype = base_dtype(method, "bf16")
    model, _ = random_model(shape, dtype, device)
    lora = None if method == "full" else LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS,
                                                    use_dora=method == "dora")
    apply_method(model, method, lora, QloraSection(compute_dtype="bfloat16"), device)
    model.gradient_checkpointing = args.grad_ckpt
    model.train()
    return model, count_params(model)


def hf_setup(method: str, shape: dict, device: torch.device, args):
    import transformers

    cfg = transformers.LlamaConfig(**shape)
    with device:
        model = transformers.LlamaForCausalLM(cfg)
    if method == "hf-full":
        model.float()
    else:
        import peft

        model.to(torch.bfloat16)
        model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                           target_modules=TARGETS, task_type="CAUSAL_LM"))
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, (trainable, sum(p.numel() for p in model.parameters()))


def hf_loss(model, batch):
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"]).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), reduction="sum")


def run_child(method: str, args) -> dict:
    from training.config import OptimSection
    from training.optim import build_optimizer
    from training.trainer import Trainer, causal_lm_loss, resolve_precision

    device = torch.device(args.device)
    shape = SHAPES[args.shape]
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    setup = hf_setup if method.startswith("hf-") else ember_setup
    model, (trainable, total) = setup(method, shape, device, args)
    weights_bytes = torch.cuda.memory_allocated() if device.type == "cuda" else None
    optimizer = build_optimizer(model, OptimSection(lr=1e-5, weight_decay=0.0))
    trainer = Trainer(model, optimizer, None, precision=resolve_precision("bf16" if device.type == "cuda" else "fp32",
                                                                          device),
                      max_grad_norm=1.0, loss_fn=hf_loss if method.startswith("hf-") else causal_lm_loss)
    gen = torch.Generator(device="cpu").manual_seed(1)

    def batch():
        ids = torch.randint(0, shape["vocab_size"], (args.batch, args.seq_len + 1), generator=gen)
        return {"input_ids": ids[:, :-1].to(device), "labels": ids[:, 1:].to(device)}

    times, losses = [], []
    for i in range(args.warmup + args.steps):
        b = batch()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = trainer.step([b])
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            losses.append(result.loss)
    tokens = args.batch * args.seq_len
    return {
        "method": method, "trainable_params": trainable, "total_params": total,
        "weights_gib": weights_bytes / 2**30 if weights_bytes is not None else None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "tokens_per_s": tokens * len(times) / sum(times),
        "median_step_s": statistics.median(times),
        "loss_first": losses[0], "loss_last": losses[-1],
    }


# ---------------------------------------------------------------------------------------------
# Parent: spawn one child per method, print a table, write JSON
# ---------------------------------------------------------------------------------------------

def commit() -> str:
    if os.environ.get("EMBER_COMMIT"):
        return os.environ["EMBER_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def child_args(args, method: str) -> list[str]:
    out = [sys.executable, __file__, "--child", method, "--shape", args.shape, "--device", args.device,
           "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--rank", str(args.rank)]
    return out + (["--grad-ckpt"] if args.grad_ckpt else [])


def render_table(record: dict) -> str:
    """The markdown block of docs/performance.md for one results file."""
    s = record["settings"]
    rows = {r["method"]: r for r in record["results"] if "error" not in r}
    full = rows.get("full")
    lines = [f"Run {record['date']}, commit `{record['commit']}`, {record['gpu']}, torch {record['torch']}. "
             f"Command: `{record.get('command', 'python benchmarks/bench_finetune.py')}`", "",
             f"Random-weight Llama-3.2-1B shape ({record['results'][0]['total_params']:,} parameters, 128k vocabulary), "
             f"batch {s['batch']} x {s['seq_len']} tokens, rank {s['rank']} on all seven projections, AdamW, bf16 "
             f"autocast, activation checkpointing {'on' if s['grad_ckpt'] else 'off'}; {s['steps']} measured steps "
             f"after {s['warmup']} warm-up steps.", "",
             "| method | trainable | weights GiB | peak GiB | tokens/s | vs Ember full |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        ratio = r["tokens_per_s"] / full["tokens_per_s"] if full else None
        lines.append(f"| {name} | {r['trainable_params']:,} | {r['weights_gib']:.2f} | {r['peak_gib']:.2f} | "
                     f"{r['tokens_per_s']:,.0f} | {'-' if ratio is None else f'{ratio:.2f}x'} |")
    return "\n".join(lines)


def render_into(doc: Path, results: Path) -> None:
    """Fill the `finetune` block of doc from the newest finetune JSON in the results folder."""
    import re

    found = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]
    found = [d for d in found if d.get("benchmark") == "finetune"]
    if not found:
        raise SystemExit(f"no finetune results in {results}")
    table = render_table(max(found, key=lambda d: d["date"]))
    pattern = re.compile(r"(<!-- BEGIN finetune -->\n).*?(\n<!-- END finetune -->)", re.S)
    text = doc.read_text()
    if not pattern.search(text):
        raise SystemExit(f"{doc}: no <!-- BEGIN finetune --> ... <!-- END finetune --> block")
    doc.write_text(pattern.sub(lambda m: m.group(1) + table + m.group(2), text))
    print(f"rendered finetune into {doc}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing per decoder layer")
    p.add_argument("--out", default=None, help="JSON results file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--render", nargs=2, metavar=("RESULTS_DIR", "DOC"), default=None,
                   help="only fill DOC's finetune block from the newest results JSON, e.g. "
                        "benchmarks/results docs/performance.md")
    args = p.parse_args()
    if args.render:
        render_into(Path(args.render[1]), Path(args.render[0]))
        return
    if args.child:
        print("RESULT " + json.dumps(run_child(args.child, args)), flush=True)
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    results = []
    for method in methods:
        proc = subprocess.run(child_args(args, method), capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            results.append({"method": method, "error": " | ".join(tail)})
            print(f"{method}: failed: {' | '.join(tail)}", flush=True)
            continue
        results.append(json.loads(lines[-1][len("RESULT "):]))
        print(f"{method}: done", flush=True)
    base = next((r for r in results if r.get("method") == "full" and "error" not in r), None)
    print(f"\n{'method':<9} {'trainable':>13} {'weights GiB':>11} {'peak GiB':>9} {'tokens/s':>10} {'vs full':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['method']:<9} error")
            continue
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        gib = (lambda v: f"{v:.2f}" if v is not None else "-")
        print(f"{r['method']:<9} {r['trainable_params']:>13,} {gib(r['weights_gib']):>11} {gib(r['peak_gib']):>9} "
              f"{r['tokens_per_s']:>10,.0f} {ratio:>8.2f}")
    record = {
        "benchmark": "finetune", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(), "host": platform.node(), "torch": torch.__version__,
        "command": "python " + " ".join(["benchmarks/bench_finetune.py", *sys.argv[1:]]),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "child")},
        "shape": SHAPES[args.shape], "results": results,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

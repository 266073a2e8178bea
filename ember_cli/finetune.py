"""`ember finetune`, `ember dpo`, `ember merge` and `ember perplexity`: fine-tuning and adapter tools."""
from __future__ import annotations

import argparse
import json


def _common(p: argparse.ArgumentParser, method_default: str | None) -> None:
    p.add_argument("--base", help="base checkpoint directory (Hugging Face layout)")
    p.add_argument("--data", help="training data: JSON/JSONL rows, or a text file with data.format=text")
    p.add_argument("--method", choices=["lora", "dora", "qlora", "full"], default=method_default,
                   help="what to train (default: the config's, else lora)")
    p.add_argument("--out", help="output directory (adapter in PEFT layout, or a full checkpoint)")
    p.add_argument("--config", help="YAML config (see configs/finetune/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. lora.r=8 train.max_steps=100 data.packing=true")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="supervised fine-tuning: LoRA, DoRA, QLoRA or full weights")
    _common(p, None)
    p.set_defaults(func=run_finetune_cmd)

    d = sub.add_parser("dpo", help="preference tuning (DPO) on prompt/chosen/rejected pairs")
    _common(d, None)
    d.set_defaults(func=run_dpo_cmd)

    m = sub.add_parser("merge", help="fold a LoRA/DoRA adapter into its base and write a full checkpoint")
    m.add_argument("--base", required=True, help="base checkpoint directory")
    m.add_argument("--adapter", required=True, help="adapter directory (adapter_config.json + safetensors)")
    m.add_argument("--out", required=True, help="output checkpoint directory")
    m.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the base's)")
    m.set_defaults(func=run_merge_cmd)

    q = sub.add_parser("perplexity", help="held-out perplexity of a checkpoint, optionally with an adapter")
    q.add_argument("--model", required=True, help="checkpoint directory")
    q.add_argument("--adapter", default=None, help="adapter directory to apply")
    q.add_argument("--data", required=True, help="text file, or JSON/JSONL instruction rows")
    q.add_argument("--format", default="auto", help="text | auto | alpaca | chat | sharegpt (default: text for "
                                                    "non-JSON files)")
    q.add_argument("--range", nargs=2, type=float, default=[0.0, 1.0], metavar=("START", "END"),
                   help="fraction of a text file to score, e.g. 0.9 1.0")
    q.add_argument("--seq-len", type=int, default=256)
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--device", default="auto")
    q.set_defaults(func=run_perplexity_cmd)


def _config(args: argparse.Namespace):
    from training.finetune_config import load_finetune_config

    cfg = load_finetune_config(args.config, args.overrides, base=args.base, method=args.method,
                               out_dir=args.out, **{"data.path": args.data})
    missing = [flag for flag, value in (("--base", cfg.base), ("--data", cfg.data.path)) if not value]
    if missing:
        raise ValueError(f"{' and '.join(missing)} must be given (or set in --config)")
    return cfg


def run_finetune_cmd(args: argparse.Namespace) -> int:
    from training.sft import run_sft

    summary = run_sft(_config(args))
    print(json.dumps(summary, indent=2))
    return 0


def run_dpo_cmd(args: argparse.Namespace) -> int:
    from training.dpo import run_dpo

    summary = run_dpo(_config(args))
    print(json.dumps(summary, indent=2))
    return 0


def run_merge_cmd(args: argparse.Namespace) -> int:
    from training.merge import merge_adapter

    out = merge_adapter(args.base, args.adapter, args.out, dtype=args.dtype)
    print(f"wrote merged checkpoint to {out}")
    return 0


def run_perplexity_cmd(args: argparse.Namespace) -> int:
    from training.evaluate import perplexity

    fmt = args.format
    if fmt == "auto" and not args.data.endswith((".json", ".jsonl")):
        fmt = "text"
    result = perplexity(args.model, args.data, adapter_dir=args.adapter, fmt=fmt, char_range=args.range,
                        seq_len=args.seq_len, batch_size=args.batch_size, device=args.device)
    print(json.dumps(result))
    return 0

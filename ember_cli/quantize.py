"""`ember quantize`: write an int8 or int4 weight-only copy of a checkpoint."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a checkpoint's linear layers to int8 or int4 (round to nearest)")
    p.add_argument("--model", required=True, help="input checkpoint directory (Hugging Face layout)")
    p.add_argument("--out", required=True, help="output directory for the quantized checkpoint")
    p.add_argument("--bits", type=int, required=True, choices=[4, 8])
    p.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128],
                   help="int4 group size along the input dimension (ignored for 8 bits)")
    p.add_argument("--dtype", default=None, help="dtype of scales and unquantized layers (default: the checkpoint's)")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="quantize lm_head too (not possible when it shares the embedding)")
    p.set_defaults(func=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    from engine.quant import quantize_checkpoint

    skip = () if args.quantize_lm_head else ("lm_head",)
    out = quantize_checkpoint(args.model, args.out, args.bits, args.group_size, args.dtype, skip)
    print(f"wrote {args.bits}-bit checkpoint to {out}")
    return 0

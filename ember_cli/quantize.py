"""`ember quantize`: write an int8 or int4 weight-only copy of a checkpoint."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a checkpoint's linear layers to int8 or int4 "
                                        "(round to nearest, or GPTQ with --calib)")
    p.add_argument("--model", required=True, help="input checkpoint directory (Hugging Face layout)")
    p.add_argument("--out", required=True, help="output directory for the quantized checkpoint")
    p.add_argument("--bits", type=int, required=True, choices=[4, 8])
    p.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128],
                   help="int4 group size along the input dimension (ignored for 8 bits)")
    p.add_argument("--dtype", default=None, help="dtype of scales and unquantized layers (default: the checkpoint's)")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="quantize lm_head too (a head tied to the embedding gets its own quantized copy; "
                        "the embedding stays in floating point)")
    p.add_argument("--lm-head-bits", type=int, default=None, choices=[4, 8],
                   help="quantize lm_head to this width instead of --bits (implies --quantize-lm-head; "
                        "e.g. --bits 4 --lm-head-bits 8: int4 layers, int8 head)")
    p.add_argument("--calib", default=None, metavar="TEXT_FILE",
                   help="choose the codes with GPTQ, calibrated on windows of this text (default: round to nearest)")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration windows (GPTQ)")
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration window (GPTQ)")
    p.add_argument("--device", default="cpu", help="where GPTQ runs the model and its solves, e.g. cuda")
    p.add_argument("--no-fold-norms", action="store_true",
                   help="keep the layer norms' weights as they are (by default they are folded into the "
                        "projections before quantizing, so the server can skip the norm kernels)")
    p.set_defaults(func=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    from engine.quant import quantize_checkpoint

    quantize_head = args.quantize_lm_head or args.lm_head_bits is not None
    skip = () if quantize_head else ("lm_head",)
    overrides = None
    if args.lm_head_bits is not None and args.lm_head_bits != args.bits:
        overrides = {"lm_head": {"bits": args.lm_head_bits, "group_size": args.group_size}}
    if args.calib_samples < 1 or args.calib_seq_len < 2:
        raise SystemExit("--calib-samples must be >= 1 and --calib-seq-len >= 2")
    out = quantize_checkpoint(args.model, args.out, args.bits, args.group_size, args.dtype, skip,
                              calibration_text=args.calib, calibration_samples=args.calib_samples,
                              calibration_seq_len=args.calib_seq_len, device=args.device,
                              fold_norms=not args.no_fold_norms, overrides=overrides)
    head = f", {args.lm_head_bits}-bit lm_head" if overrides else ""
    print(f"wrote {args.bits}-bit{head} checkpoint ({'GPTQ' if args.calib else 'round to nearest'}) to {out}")
    return 0

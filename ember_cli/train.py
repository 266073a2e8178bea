"""`ember train` (pretraining from a YAML config) and `ember eval-ppl` (perplexity of a checkpoint)."""
from __future__ import annotations

import argparse
import json
import os


def register(sub: argparse._SubParsersAction) -> None:
    """Add the train and eval-ppl subcommands."""
    p = sub.add_parser(
        "train", help="pretrain a model from a YAML config (one process, or many under torchrun)",
        description="Pretrain from configs/NAME.yaml. Overrides are dotted keys: train.max_steps=100 "
                    "optim.lr=1e-3 model.num_hidden_layers=4. For several GPUs: "
                    "torchrun --nproc_per_node N -m ember_cli.main train --config ...",
    )
    p.add_argument("--config", required=True, metavar="FILE.yaml", help="training config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides with dotted keys")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in <out_dir>/checkpoints, if any")
    p.set_defaults(func=run_train)

    e = sub.add_parser("eval-ppl", help="token-level perplexity of a checkpoint on a text file",
                       description="Perplexity over a text file encoded as one stream, with a strided sliding window.")
    e.add_argument("--model", required=True, metavar="DIR", help="checkpoint folder (Hugging Face layout)")
    e.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file")
    e.add_argument("--seq-len", type=int, help="window length (default: the model's context, at most 2048)")
    e.add_argument("--stride", type=int, help="tokens between window starts (default: seq-len / 2)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--device", default="auto", help="auto, cpu or cuda")
    e.add_argument("--dtype", help="float32, bfloat16 or float16 (default: the checkpoint's; float32 on CPU)")
    e.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    e.set_defaults(func=run_eval_ppl)


def run_train(args: argparse.Namespace) -> int:
    from training.config import ConfigError, load_config
    from training.pretrain import pretrain

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    result = pretrain(cfg, resume=args.resume)
    if result.val_loss is not None and os.environ.get("RANK", "0") == "0":
        print(f"validation loss {result.val_loss:.4f}")
    return 0


def run_eval_ppl(args: argparse.Namespace) -> int:
    from training.eval_ppl import eval_perplexity

    res = eval_perplexity(args.model, args.text, seq_len=args.seq_len, stride=args.stride,
                          batch_size=args.batch_size, device=args.device, dtype=args.dtype)
    print(f"perplexity {res.perplexity:.3f}  loss {res.loss:.4f} nats/token  {res.bits_per_byte:.4f} bits/byte  "
          f"({res.tokens:,} tokens, seq_len {res.seq_len}, stride {res.stride})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res.to_dict(), f, indent=2)
            f.write("\n")
    return 0

"""`ember train-tokenizer`: a SentencePiece BPE tokenizer in the checkpoint layout."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-tokenizer", help="train a SentencePiece BPE tokenizer (tokenizer.model + tokenizer_config.json)")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="text files (.txt or .txt.gz), one or more sentences a line")
    p.add_argument("--out", required=True, help="output directory (a checkpoint directory works)")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--max-sentences", type=int, default=None, help="train on a seeded random sample of this many lines")
    p.add_argument("--model-max-length", type=int, default=2048, help="written to tokenizer_config.json")
    p.set_defaults(func=run_train_tokenizer)


def run_train_tokenizer(args: argparse.Namespace) -> int:
    from pathlib import Path

    from engine.tokenizer import Tokenizer
    from training.tokenizer_train import train_tokenizer

    files = [Path(f) for f in args.input]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"--input {f}: no such file")
    out = train_tokenizer(
        files, args.out, args.vocab_size, max_sentences=args.max_sentences, model_max_length=args.model_max_length
    )
    tok = Tokenizer.from_dir(out)
    print(f"wrote {out}/tokenizer.model ({tok.vocab_size} tokens), tokenizer_config.json, special_tokens_map.json")
    return 0

"""`ember prepare-data`: raw text files to packed token shards for pretraining."""
from __future__ import annotations

import argparse
import os


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the prepare-data subcommand."""
    p = subparsers.add_parser(
        "prepare-data",
        help="clean, filter, deduplicate and tokenize text into token shards",
        description=(
            "Read .txt/.jsonl files or folders (optionally .gz), clean, filter and deduplicate the documents, "
            "split them into train/val and tokenize them into packed token shards with a manifest.json."
        ),
    )
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="files or folders to read")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer folder (checkpoint layout)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for the shards and manifest.json")
    p.add_argument("--config", metavar="FILE.yaml", help="data settings (see configs/data/default.yaml)")
    p.add_argument("--val-input", nargs="+", default=[], metavar="PATH", help="inputs that form the validation split")
    p.add_argument("--val-fraction", type=float, help="share of documents sent to the validation split")
    p.add_argument("--seed", type=int, help="seed of the train/val split")
    p.add_argument("--text-field", help="JSON key of the text in .jsonl inputs (default: text)")
    p.add_argument(
        "--doc-separator",
        help="how text files split into documents: auto, blank, line, none, or a literal marker such as '<|endoftext|>'",
    )
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8), help="worker processes (default: CPUs, at most 8)")
    p.add_argument("--overwrite", action="store_true", help="replace prepared data already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the config from the file and flags, run the pipeline, print the summary."""
    from training.data import DataConfig, prepare_data

    config = DataConfig.from_yaml(args.config) if args.config else DataConfig()
    overrides = {
        "val_fraction": args.val_fraction,
        "seed": args.seed,
        "text_field": args.text_field,
        "doc_separator": args.doc_separator,
    }
    config = config.replace(**{k: v for k, v in overrides.items() if v is not None})
    result = prepare_data(
        args.input,
        args.out,
        args.tokenizer,
        config,
        val_inputs=args.val_input,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(result.summary_table())
    print(f"wrote {result.out_dir / 'manifest.json'}")
    return 0

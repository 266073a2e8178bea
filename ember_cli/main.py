"""The `ember` command: one entry point, one module per subcommand group.

Each module in COMMANDS defines `register(subparsers)`, which adds its subcommands and sets
`func` on each parser. Modules are imported lazily by name so `ember --help` stays fast and a
heavy dependency (transformers, bitsandbytes, fastapi) is only imported by the command that needs it.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from engine.errors import EmberError

COMMANDS = [
    "ember_cli.train",
    "ember_cli.generate",
    "ember_cli.data",
    "ember_cli.tokenizer",
    "ember_cli.quantize",
    "ember_cli.finetune",
    "ember_cli.serve", "ember_cli.chat", "ember_cli.bench",
    "ember_cli.eval",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember", description="Ember: LLM inference server and training stack.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, EmberError) as exc:  # user errors: one clear line, no traceback
        print(f"ember {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())

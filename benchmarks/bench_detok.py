"""Host time of incremental detokenization per streamed token, with and without the delta memo.

`--streams` streams, each starting at a random offset of a text file (5 tokens of context), are
fed `--tokens` tokens each, interleaved as the engine feeds them (one token per stream per step).
Each run starts with an empty memo; runs alternate memo off / on. Runs anywhere (CPU only).

    python benchmarks/bench_detok.py --model models/ember-stories --text some.txt --out detok.json
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from run_info import run_info, write_json  # noqa: E402

import engine.detokenizer as detok  # noqa: E402
from engine.tokenizer import Tokenizer  # noqa: E402


def us_per_token(tok: Tokenizer, ids: list[int], starts: list[int], tokens: int, memo: bool) -> tuple[float, int]:
    """Microseconds per token over one interleaved run, and the memo's size at its end."""
    detok._caches.clear()
    saved = detok._delta_cache
    if not memo:
        detok._delta_cache = lambda tokenizer: None
    try:
        streams = [detok.IncrementalDetokenizer(tok, ids[s:s + 5]) for s in starts]
        start = time.perf_counter()
        for k in range(tokens):
            for d, s in zip(streams, starts):
                d.add(ids[s + 5 + k])
        elapsed = time.perf_counter() - start
    finally:
        detok._delta_cache = saved
    return elapsed / (len(starts) * tokens) * 1e6, len(detok._caches.get(tok, {}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/ember-stories", help="checkpoint directory with the tokenizer")
    ap.add_argument("--text", required=True, help="a UTF-8 text file to stream")
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/bench_detok.json")
    args = ap.parse_args(argv)
    tok = Tokenizer.from_dir(args.model)
    ids = tok.encode(Path(args.text).read_text(encoding="utf-8")[:1_000_000])
    if len(ids) < args.tokens + 16:
        ap.error(f"{args.text} has {len(ids)} tokens; --tokens {args.tokens} needs at least {args.tokens + 16}")
    rng = random.Random(args.seed)
    starts = [rng.randrange(0, len(ids) - args.tokens - 5) for _ in range(args.streams)]
    runs = []
    for _ in range(args.rounds):
        for memo in (False, True):
            us, entries = us_per_token(tok, ids, starts, args.tokens, memo)
            runs.append({"memo": memo, "us_per_token": us, "memo_entries": entries})
            print(f"memo {'on ' if memo else 'off'}: {us:.2f} us a token ({entries} memo entries)")
    write_json(args.out, {"benchmark": "detokenize", **run_info(sys.argv), "settings": vars(args), "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())

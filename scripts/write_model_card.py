"""Write the model card (README.md) of a finished pretraining run: data, size, tokens seen, perplexity, samples.

    python scripts/write_model_card.py --run runs/ember-stories/run --out runs/ember-stories/run/final/README.md
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _last(records: list[dict], key: str):
    values = [r[key] for r in records if key in r]
    return values[-1] if values else None


def samples(model_dir: Path, prompts: list[str], max_new_tokens: int = 120) -> list[tuple[str, str]]:
    """(how, text) pairs: a greedy and a sampled continuation of each prompt."""
    from engine.checkpoint import load_model
    from engine.generate import generate_reference
    from engine.tokenizer import Tokenizer

    model, _ = load_model(model_dir, dtype="float32")
    tok = Tokenizer.from_dir(model_dir)
    out = []
    for i, prompt in enumerate(prompts):
        ids = tok.encode(prompt, add_bos=True)
        for how, temp in (("greedy", 0.0), ("temperature 0.7, top-p 0.95", 0.7)):
            new = generate_reference(model, ids, max_new_tokens, temperature=temp, top_p=0.95, seed=i,
                                     eos_ids=sorted(tok.eos_ids))
            out.append((how, tok.decode(ids + new)))  # decoding together keeps the space at the seam
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="the run's out_dir (holds final/, metrics.jsonl, eval_ppl.json)")
    ap.add_argument("--out", required=True, help="README.md to write")
    ap.add_argument("--hardware", help='what trained it, e.g. "one NVIDIA H200" (default: this machine)')
    args = ap.parse_args()
    run = Path(args.run)
    cfg = yaml.safe_load((run / "final" / "train_config.yaml").read_text())
    hf = json.loads((run / "final" / "config.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    ppl = json.loads((run / "eval_ppl.json").read_text())
    manifest = json.loads((Path(cfg["data"]["train"]) / "manifest.json").read_text())
    from build_host import built_on
    from engine.config import ModelConfig

    n_params = ModelConfig.from_hf_dict(hf).num_parameters()
    train_tokens = manifest["splits"]["train"]["num_tokens"]
    tokens_seen = _last(records, "tokens") or 0
    val_loss = _last(records, "val_loss")
    m = cfg["model"]
    lines = [
        f"# {cfg['name']}",
        "",
        "Ember's bundled default model: a small Llama-style decoder trained from scratch on TinyStories with",
        "Ember's own pipeline (`scripts/train_default_model.sh`). It writes short, simple children's stories",
        "in English; it knows nothing else. Use it to try Ember, not for real tasks.",
        "",
        "| | |",
        "| --- | --- |",
        f"| parameters | {n_params / 1e6:.2f}M ({m['num_hidden_layers']} layers, hidden {m['hidden_size']}, "
        f"{m['num_attention_heads']} query / {m['num_key_value_heads']} KV heads, SwiGLU {m['intermediate_size']}, "
        f"tied embeddings) |",
        f"| context | {m['max_position_embeddings']} tokens |",
        f"| tokenizer | SentencePiece BPE, {hf['vocab_size']} pieces, byte fallback, trained on the cased sample |",
        f"| weights | {hf.get('torch_dtype', 'bfloat16')}, safetensors, Hugging Face Llama layout |",
        "| training data | TinyStories (Eldan & Li 2023, CDLA-Sharing-1.0): the cased 2 MiB sample of TinyStories-train.txt "
        "plus the further stories of the lowercased 4 MB sample with their casing restored "
        f"(`scripts/tinystories_corpus.py`); after cleaning and deduplication {manifest['splits']['train']['num_documents']:,} "
        f"documents, {train_tokens:,} tokens |",
        f"| tokens seen | {tokens_seen:,} ({tokens_seen / max(train_tokens, 1):.1f} epochs), "
        f"{cfg['train']['max_steps']} steps of {cfg['data']['micro_batch_size'] * cfg['train']['grad_accum_steps']}"
        f" x {cfg['data']['seq_len']} tokens |",
        f"| optimiser | AdamW lr {cfg['optim']['lr']}, betas {cfg['optim']['betas']}, weight decay "
        f"{cfg['optim']['weight_decay']}, warm-up {cfg['schedule']['warmup_steps']} steps then cosine to "
        f"{cfg['schedule']['min_lr_ratio']:.0%} |",
        f"| validation perplexity | **{ppl['perplexity']:.2f}** per token ({ppl['loss']:.4f} nats, "
        f"{ppl['bits_per_byte']:.3f} bits/byte) on `valid_sample_cased.txt` (held-out TinyStories validation "
        f"text, {ppl['tokens']:,} tokens, window {ppl['seq_len']}, stride {ppl['stride']}) |",
        f"| trained on | {built_on(cfg['train'].get('device', 'auto'), args.hardware)} |",
    ]
    if val_loss is not None:
        lines.append(f"| last in-training validation loss | {val_loss:.4f} (perplexity {math.exp(val_loss):.2f}, "
                     "paragraph-level documents) |")
    lines += ["", "Loss curve: `loss_curve.png`. Training config: `train_config.yaml`.", "",
              "## Samples", ""]
    prompts = cfg["eval"]["prompts"] or ["Once upon a time"]
    torch.manual_seed(0)
    for how, text in samples(run / "final", prompts):
        lines += [f"*{how}:*", "", "> " + text.strip().replace("\n", "\n> "), ""]
    lines += ["## Reproduce", "", "```bash", "scripts/train_default_model.sh", "```", ""]
    Path(args.out).write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

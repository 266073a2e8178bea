"""Write the model card (README.md) of a fine-tuned adapter from its run folder and perplexity results.

Usage: python scripts/write_adapter_card.py --run RUN --base-ppl BASE.json --adapter-ppl ADAPTER.json --out README.md
RUN is an `ember finetune` output folder (finetune_summary.json, finetune_config.yaml, adapter_config.json);
the two JSON files are `ember perplexity` outputs on the same held-out data.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def card(run: Path, base_ppl: dict, adapter_ppl: dict, name: str, built: str) -> str:
    """The card's Markdown; `built` says where and when it was trained (`build_host.built_on`)."""
    summary = json.loads((run / "finetune_summary.json").read_text())
    cfg = yaml.safe_load((run / "finetune_config.yaml").read_text())
    adapter = json.loads((run / "adapter_config.json").read_text())
    drop = 1.0 - adapter_ppl["ppl"] / base_ppl["ppl"]
    lo, hi = cfg["data"]["range"]
    vlo, vhi = base_ppl["range"]
    kind = "DoRA" if adapter["use_dora"] else "LoRA"
    span = f"the first {hi:.0%}" if lo == 0 else f"{lo:.0%}-{hi:.0%}"
    return f"""---
library_name: peft
base_model: {summary['base']}
tags: [ember, lora, text-generation]
---
# {name}: a {kind} style adapter

A {kind} adapter (rank {adapter['r']}, alpha {adapter['lora_alpha']:g}, on {', '.join(adapter['target_modules'])})
for `{summary['base']}`, trained with `ember finetune` as plain-text language modelling on {span} of the characters
of Tiny Shakespeare (`{summary['data']}`). The last {vhi - vlo:.0%} of the file was held
out and never trained on.

## Held-out perplexity

| model | loss (nats/token) | perplexity |
|---|---|---|
| base | {base_ppl['loss']:.4f} | {base_ppl['ppl']:.2f} |
| base + adapter | {adapter_ppl['loss']:.4f} | {adapter_ppl['ppl']:.2f} |

The adapter lowers held-out perplexity by **{drop:.1%}** ({base_ppl['windows']} windows of
{base_ppl['seq_len']} tokens, fp32, the same windows for both rows; `ember perplexity --range {vlo:g} {vhi:g}`).

## Training

{summary['steps']} steps, {cfg['data']['micro_batch_size']} x {cfg['data']['seq_len']} tokens a step, AdamW lr
{cfg['optim']['lr']:g} with {cfg['schedule']['warmup_steps']} warm-up steps and {cfg['schedule']['decay']} decay,
precision `{cfg['train']['precision']}`; {summary['trainable_params']:,} trainable parameters of
{summary['total_params']:,}. Final training loss {summary['final_train_loss']:.4f}. Trained on {built}.
Reproduce: `scripts/train_shakespeare_adapter.sh` (config: `configs/finetune/shakespeare-lora.yaml`).

## Use

    ember serve --model {summary['base']} --enable-lora --lora shakespeare=models/ember-stories-shakespeare
    ember merge --base {summary['base']} --adapter models/ember-stories-shakespeare --out runs/merged

or with `peft`: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), ADAPTER_DIR)`.
Data: Tiny Shakespeare (karpathy/char-rnn, MIT; the text is public domain).
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--base-ppl", required=True, type=Path)
    p.add_argument("--adapter-ppl", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--name", default="ember-stories-shakespeare")
    p.add_argument("--hardware", help='what trained it, e.g. "one NVIDIA H200" (default: this machine)')
    args = p.parse_args()
    from build_host import built_on  # beside this script; imports torch to look for a GPU

    cfg = yaml.safe_load((args.run / "finetune_config.yaml").read_text())
    built = built_on(cfg.get("train", {}).get("device", "auto"), args.hardware)
    text = card(args.run, json.loads(args.base_ppl.read_text()), json.loads(args.adapter_ppl.read_text()),
                args.name, built)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

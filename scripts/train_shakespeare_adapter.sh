#!/usr/bin/env bash
# Train the demonstration adapter: a LoRA giving the bundled default model a Shakespearean style.
#   1. ember finetune on the first 90% of tinyshakespeare's input.txt (configs/finetune/shakespeare-lora.yaml)
#   2. ember perplexity on the held-out last 10%, base alone and base + adapter (same windows, fp32)
#   3. model card with both figures, then the adapter goes to models/ember-stories-shakespeare/
# One H200 runs it in under three minutes; a CPU works too, slowly. Extra arguments are config overrides
# for `ember finetune`, e.g.  scripts/train_shakespeare_adapter.sh train.max_steps=20 train.device=cpu
#
# Environment: BASE   the base model (default models/ember-stories)
#              DATA   tinyshakespeare's input.txt (default ../shared/data/tinyshakespeare/input.txt)
#              WORK   scratch folder for the run (default runs/shakespeare-adapter)
#              DEST   where the finished adapter goes (default models/ember-stories-shakespeare)
#              PYTHON interpreter with Ember's dependencies (default: .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=${BASE:-models/ember-stories}
DATA=${DATA:-../shared/data/tinyshakespeare/input.txt}
WORK=${WORK:-runs/shakespeare-adapter}
DEST=${DEST:-models/ember-stories-shakespeare}
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
EMBER=("$PYTHON" -m ember_cli.main)
[[ -f $DATA ]] || { echo "missing $DATA (set DATA to tinyshakespeare's input.txt)" >&2; exit 2; }
[[ -f $BASE/config.json ]] || { echo "missing $BASE (train it with scripts/train_default_model.sh)" >&2; exit 2; }
export PYTHONUNBUFFERED=1
start=$(date +%s)
step() { echo "== [$(( $(date +%s) - start ))s] $*"; }

step "LoRA fine-tuning on the first 90% of $DATA"
rm -rf "$WORK/run"
"${EMBER[@]}" finetune --config configs/finetune/shakespeare-lora.yaml --base "$BASE" --data "$DATA" \
  --out "$WORK/run" data.val_path="$DATA" "$@"

step "held-out perplexity (last 10%, never trained on): base, then base + adapter"
"${EMBER[@]}" perplexity --model "$BASE" --data "$DATA" --range 0.9 1.0 --seq-len 512 > "$WORK/ppl_base.json"
"${EMBER[@]}" perplexity --model "$BASE" --adapter "$WORK/run" --data "$DATA" --range 0.9 1.0 --seq-len 512 \
  > "$WORK/ppl_adapter.json"
cat "$WORK/ppl_base.json" "$WORK/ppl_adapter.json"

step "model card and copy to $DEST"
"$PYTHON" scripts/write_adapter_card.py --run "$WORK/run" --base-ppl "$WORK/ppl_base.json" \
  --adapter-ppl "$WORK/ppl_adapter.json" --out "$WORK/run/README.md"
rm -rf "$DEST"
mkdir -p "$DEST"
cp "$WORK"/run/{adapter_config.json,adapter_model.safetensors,README.md,finetune_summary.json,finetune_config.yaml} \
  "$WORK/ppl_base.json" "$WORK/ppl_adapter.json" "$DEST"/
step "done: $DEST ($(du -sh "$DEST" | cut -f1))"

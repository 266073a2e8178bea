#!/usr/bin/env bash
# Build Ember's bundled default model (models/ember-stories/) from the raw TinyStories text, end to end:
#   training text -> train-tokenizer -> prepare-data -> train -> eval-ppl -> model card -> models/ember-stories/
# One H200 runs it in a few minutes; a CPU works too, slowly. Extra arguments are config overrides for
# `ember train`, e.g.  scripts/train_default_model.sh train.max_steps=20 train.device=cpu
#
# Environment: DATA   folder with the TinyStories samples (default ../shared/data/tinystories)
#              WORK   scratch folder for tokenizer, shards and the run (default runs/ember-stories)
#              DEST   where the finished model goes (default models/ember-stories)
#              EXTRA  1 (default): add the recased new stories of the lowercased sample (scripts/tinystories_corpus.py)
#              PYTHON interpreter with Ember's dependencies (default: .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-../shared/data/tinystories}
WORK=${WORK:-runs/ember-stories}
DEST=${DEST:-models/ember-stories}
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
EMBER=("$PYTHON" -m ember_cli.main)
TRAIN_TEXT=$DATA/train_sample_2MiB_cased.txt
VALID_TEXT=$DATA/valid_sample_cased.txt
needed=("$TRAIN_TEXT" "$VALID_TEXT")
[[ ${EXTRA:-1} == 1 ]] && needed+=("$DATA/train_sample_4MB_lowercase.txt")
for f in "${needed[@]}"; do
  [[ -f $f ]] || { echo "missing $f (set DATA to the TinyStories folder)" >&2; exit 2; }
done
export PYTHONUNBUFFERED=1
start=$(date +%s)
step() { echo "== [$(( $(date +%s) - start ))s] $*"; }

step "training text"
extra=(); [[ ${EXTRA:-1} == 1 ]] || extra=(--no-extra)
"$PYTHON" scripts/tinystories_corpus.py --data "$DATA" --out "$WORK/train.txt" "${extra[@]}"

step "tokenizer: SentencePiece BPE, 4096 pieces, on the cased sample"
"${EMBER[@]}" train-tokenizer --input "$TRAIN_TEXT" --out "$WORK/tokenizer" --vocab-size 4096 --model-max-length 512

step "token shards (validation split = the held-out validation sample)"
"${EMBER[@]}" prepare-data --input "$WORK/train.txt" --val-input "$VALID_TEXT" --tokenizer "$WORK/tokenizer" \
  --out "$WORK/data" --overwrite --no-progress

step "pretraining"
rm -rf "$WORK/run"
"${EMBER[@]}" train --config configs/ember-stories.yaml data.train="$WORK/data" data.tokenizer="$WORK/tokenizer" \
  out_dir="$WORK/run" "$@"

step "perplexity on the validation sample"
"${EMBER[@]}" eval-ppl --model "$WORK/run/final" --text "$VALID_TEXT" --seq-len 512 --stride 256 \
  --json "$WORK/run/eval_ppl.json"

step "model card and copy to $DEST"
"$PYTHON" scripts/write_model_card.py --run "$WORK/run" --out "$WORK/run/final/README.md"
rm -rf "$DEST"
mkdir -p "$DEST"
cp "$WORK"/run/final/* "$DEST"/
cp "$WORK/run/loss_curve.png" "$WORK/run/eval_ppl.json" "$DEST"/
step "done: $DEST ($(du -sh "$DEST" | cut -f1))"

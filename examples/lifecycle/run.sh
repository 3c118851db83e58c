#!/usr/bin/env bash
# The lifecycle case on the default model (docs/lifecycle.md), one command:
#   bash examples/lifecycle/run.sh [OUT_DIR [key=value ...]]      (OUT_DIR default: runs)
# 1. tunelab run    a first fine-tune on the old catalogue (examples/lifecycle/recipe.yaml)
# 2. tunelab drift  on later labelled tickets (data/new.jsonl): expected "stale"
# 3. tunelab update with those tickets: expected the new tickets recovered and no significant loss
#    on the old test set
# Overrides after OUT_DIR go to step 1 (and so to the update, which reuses the recipe), e.g.
#   bash examples/lifecycle/run.sh /tmp/runs model.name=tiny-test train.max_steps=2 eval.limit=8
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-runs}"
shift || true
python="${PYTHON:-python}"
tunelab() { OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" "$python" -m tunelab "$@"; }

tunelab run "$here/recipe.yaml" "out_dir=$out" "$@"
tunelab drift "$out/lifecycle" "$here/data/new.jsonl"
tunelab update "$out/lifecycle" --add "$here/data/new.jsonl"
tunelab runs list --out-dir "$out"

#!/usr/bin/env bash
# Everything tunelab checks on a CUDA GPU, as one command (about 8 minutes on one H200):
#   1. tests/test_gpu.py: each GPU fast path against its reference (flash varlen attention vs the
#      masked path, compiled layers vs eager, the memory probe, the training loop varlen vs mask, the
#      evaluation's decoding loop with a shared-prefix KV cache vs greedy decoding of each prompt alone);
#   2. bench/train_speed.py --device cuda --compile: tunelab vs transformers Trainer + PEFT on the
#      135M, 360M and 1B shapes (random init, no downloads), LoRA and full fine-tuning.
# Results go to $OUT (default bench/results): gpu_tests.log, train_speed_gpu.json, train_speed_gpu.log.
# Needs torch, transformers, peft and tunelab's own dependencies; wheels in .whl/ are installed first
# when present (a machine with no package index: scripts/fetch-device-wheels.sh downloads them).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tunelab-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/tunelab-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py ${GPU_TESTS_K:+-k "$GPU_TESTS_K"} 2>&1 | tee "$OUT/gpu_tests.log"
timeout "${SUITE_TIMEOUT_S:-480}" python3 bench/train_speed.py --device cuda --compile --budget-s "${SUITE_BUDGET_S:-330}" \
  --out "$OUT/train_speed_gpu.json" 2>&1 | tee "$OUT/train_speed_gpu.log"
python3 - "$OUT/train_speed_gpu.json" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
print(f"{'config':28} {'ratio':>6} {'mem':>5} {'loss diff':>9} {'tl tok/s':>9} {'hf tok/s':>9} {'MFU%':>5} {'compiled':>8}")
for r in data["results"]:
    c = r["config"]
    name = f"{c['shape']} {c['method']} x{c['examples_per_step']}"
    if "tokens_per_s_ratio" not in r:
        print(f"{name:28} failed: {r.get('hf', {}).get('skipped') or r.get('tunelab', {}).get('skipped')}")
        continue
    comp = r.get("tunelab_compiled", {})
    print(f"{name:28} {r['tokens_per_s_ratio']:6.2f} {r['peak_mem_ratio']:5.2f} {r['loss_max_abs_diff']:9.4f} "
          f"{r['tunelab']['tokens_per_s']:9.0f} {r['hf']['tokens_per_s']:9.0f} {r['tunelab']['mfu_pct']:5.1f} "
          f"{comp.get('tokens_per_s_ratio', comp.get('skipped', '-'))!s:>8}")
PY

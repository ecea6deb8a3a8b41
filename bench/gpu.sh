#!/usr/bin/env bash
# The GPU path in one call of under 10 minutes on one GPU:
#   1. tests/test_gpu.py (every method on CUDA in bf16, the cache on the host, the SAE tools on the GPU);
#   2. the training-step benchmark on a Gemma-3-270M-shaped model (its config and 262k tokenizer, random weights)
#      in bf16: featalign DPO (cache), TDPO-2 (live), FPO (cache + SAE) against TRL DPO with precomputed reference
#      log-probs, Liger kernels off and on;
#   3. DPO on the quick world through `accelerate launch` with DeepSpeed ZeRO-2.
#
# The GPU machine has PyTorch, transformers and accelerate but no package index and no copy of the model, so:
#   bench/gpu.sh prepare   # here: the wheels it lacks into .whl/, Gemma's config and tokenizer into .gpu/
#   bench/gpu.sh run       # there, with .whl and .gpu carried: results into $OUT (else bench/results)
set -euo pipefail
cd "$(dirname "$0")/.."

# the lock's versions where the lock has them; liger-kernel and deepspeed are not in it (GPU-only)
WHEELS="trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 liger-kernel==0.8.5 \
hjson==3.1.0 py-cpuinfo==9.0.0 vadersentiment==3.3.2"

prepare() {
  mkdir -p .whl .gpu
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $WHEELS
  # deepspeed is an sdist: a pure-Python wheel of it (its ops are built just in time on the GPU machine)
  python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
  .venv/bin/python - <<'EOF'
import shutil
from featalign.models import resolve_model

src = resolve_model("packaged:gemma3-270m")
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
    shutil.copy(f"{src}/{name}", ".gpu/")
EOF
  du -sh .whl .gpu
}

run() {
  local out="${OUT:-bench/results}" t0=$SECONDS
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1 FEATALIGN_BENCH_RESULTS="$out"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu-device.txt"
  python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/gpu-tests.log" || true
  echo "tests: $((SECONDS - t0)) s"
  python3 bench/train_step.py --shape .gpu --batch-size 8 --steps 10 --max-length 192 --trl-liger \
    --only "featalign dpo (cache),featalign tdpo2,featalign fpo (cache),trl dpo sigmoid (precompute),trl dpo sigmoid (precompute, liger)" \
    2>&1 | tee "$out/gpu-train-step.log" || true
  echo "train step: $((SECONDS - t0)) s"
  python3 bench/deepspeed_run.py --out "$out" 2>&1 | tee "$out/gpu-deepspeed.log" || true
  echo "all: $((SECONDS - t0)) s"
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: bench/gpu.sh prepare|run" >&2; exit 2 ;;
esac

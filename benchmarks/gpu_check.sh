#!/usr/bin/env bash
# The prepared GPU check, one script, under 10 minutes on one GPU: the numeric counterpart of
# `softcpt-dist kernels check` (which compiles every launch for sm_80..sm_100 on any machine).
#   1. makes the project importable (installed packages first; pip only for what is missing; WHEELS=DIR
#      installs the wheels in DIR offline, for machines without an index),
#   2. runs the kernel tests that need a GPU: the dispatchers' own launches for this GPU in fp32, fp16 and
#      bf16 against the torch path (tests/kernels, `gpu` and `bf16` tests),
#   3. compiles the bounding launches with this machine's Triton for its own target (kernels check),
#   4. times each kernel against PyTorch eager, torch.compile, FlexAttention and the former uniform tiles at
#      the ViT-L-14 General-10 shape, and a full ViT-L-14 text-side training step (throughput, MFU), in bf16
#      and in fp32 (the default model.precision): benchmarks/kernel_bench.py,
#   5. runs `softcpt-dist profile` on the ViT-L-14 General-10 recipe (bf16, cached image features) with
#      random weights and General-10's shape as noise images (benchmarks/group_shapes.py): the real path.
# Each step has its own time limit and the script goes on past a failed step (its log says so).
# Output in $OUT (default benchmarks/out/gpu_check-<time>): env.txt, gpu_tests.txt, kernels_check.md,
# bf16/kernels.{md,json}, fp32/kernels.{md,json}, profile-vit-l-14/profile.{json,md}.
#   bash benchmarks/gpu_check.sh            # or: OUT=/tmp/check bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/gpu_check-$(date +%Y%m%d-%H%M%S)}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
step() { echo; echo "== $1 ($(date +%T))"; }

if [ -n "${WHEELS:-}" ]; then
  step "installing the wheels in $WHEELS (offline)"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/softcpt-site \
    "$WHEELS"/*.whl || exit 3
  export PYTHONPATH=/tmp/softcpt-site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! $PY -c "import torch, triton, open_clip, omegaconf, deepspeed, pytest; assert torch.cuda.is_available()" 2>/dev/null; then
  step "installing the project's dependencies"
  $PY -m pip install -q -e '.[dev]'
fi
if ! $PY -c "import softcpt_dist.kernels.cosine_ce" 2>/dev/null; then
  step "installing the project (editable, no dependencies)"
  $PY -m pip install -q --no-deps --no-build-isolation -e . || $PY -m pip install -q --no-deps -e .
fi
$PY - <<'PY' | tee "$OUT/env.txt"
import torch, triton, open_clip
major, minor = torch.cuda.get_device_capability()
print(f"device {torch.cuda.get_device_name()} (sm_{major}{minor}), torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"triton {triton.__version__}, open_clip {open_clip.__version__}")
PY
TARGET=$($PY -c "import torch; a, b = torch.cuda.get_device_capability(); print(10 * a + b)")

step "kernel tests on this GPU (fp32, fp16, bf16)"
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/kernels -k "gpu or bf16" 2>&1 | tee "$OUT/gpu_tests.txt" | tail -15 \
  || echo "!! kernel tests: failed or timed out"

step "kernels check: the bounding launches compiled by this Triton for sm_$TARGET"
timeout 60 $PY -m softcpt_dist.cli kernels check --targets "$TARGET" --bounding --out "$OUT" | tail -3 \
  || echo "!! kernels check: failed or timed out"

step "kernel benchmark (ViT-L-14, General-10, bf16)"
timeout 170 $PY benchmarks/kernel_bench.py --out "$OUT/bf16" --repeats 10 "$@" | tail -14 \
  || echo "!! kernel benchmark (bf16): failed or timed out"

step "kernel benchmark (ViT-L-14, General-10, fp32)"
timeout 70 $PY benchmarks/kernel_bench.py --out "$OUT/fp32" --precision fp32 --skip compile flex --repeats 10 | tail -14 \
  || echo "!! kernel benchmark (fp32): failed or timed out"

step "softcpt-dist profile (ViT-L-14 recipe, General-10 shape, bf16, cached features)"
$PY benchmarks/group_shapes.py general10 "$OUT/general10-data" 2
timeout 150 $PY -m softcpt_dist.cli profile --config configs/recipes/vit-l-14/general10.yaml model.pretrained=null \
  data.dataset=task_folders "data.root=$OUT/general10-data" data.shots=0 data.train_augment=none \
  data.cache.train_views=0 "data.cache.dir=$OUT/cache" data.num_workers=4 train.progress=false \
  --warmup 5 --steps 20 --out "$OUT/profile-vit-l-14" 2>&1 | tail -30 || echo "!! profile: failed or timed out"
rm -rf "$OUT/general10-data" "$OUT/cache"
step "done: $OUT"

#!/usr/bin/env bash
# The prepared GPU check of the Triton kernels and the profiler, one script, under 12 minutes on one GPU:
#   1. makes the project importable (installed packages first; pip only for what is missing),
#   2. runs the bf16 kernel tests (tests/kernels, the GPU-only ones; fp32 runs on CPU CI),
#   3. times each kernel against PyTorch eager, torch.compile and FlexAttention at the ViT-L-14
#      General-10 shape, and a full ViT-L-14 text-side training step (throughput, MFU):
#      benchmarks/kernel_bench.py,
#   4. runs `softcpt-dist profile` on the ViT-L-14 General-10 recipe (bf16, cached image features) with
#      random weights and General-10's shape as noise images (benchmarks/group_shapes.py): the real path.
# Output in $OUT (default benchmarks/out/gpu_check-<time>): kernels.json, kernels.md, bf16_tests.txt, env.txt,
# profile-vit-l-14/profile.{json,md}.
#   bash benchmarks/gpu_check.sh            # or: OUT=/tmp/check bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/gpu_check-$(date +%Y%m%d-%H%M%S)}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET

if ! $PY -c "import torch, triton, open_clip, omegaconf, pytest; assert torch.cuda.is_available()" 2>/dev/null; then
  echo "== installing the project's dependencies"
  $PY -m pip install -q -e '.[dev]'
fi
if ! $PY -c "import softcpt_dist.kernels.cosine_ce" 2>/dev/null; then
  echo "== installing the project (editable, no dependencies)"
  $PY -m pip install -q --no-deps --no-build-isolation -e . || $PY -m pip install -q --no-deps -e .
fi
$PY - <<'PY' | tee "$OUT/env.txt"
import torch, triton, open_clip
print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"triton {triton.__version__}, open_clip {open_clip.__version__}")
PY

echo "== bf16 kernel tests"
timeout 240 $PY -m pytest -q -p no:cacheprovider tests/kernels -k bf16 2>&1 | tee "$OUT/bf16_tests.txt" || true

echo "== kernel benchmark (ViT-L-14, General-10, bf16)"
timeout 330 $PY benchmarks/kernel_bench.py --out "$OUT" "$@"
echo "== written: $OUT/kernels.md $OUT/kernels.json"

echo "== softcpt-dist profile (ViT-L-14 recipe, General-10 shape, bf16, cached features)"
$PY benchmarks/group_shapes.py general10 "$OUT/general10-data" 2
timeout 300 $PY -m softcpt_dist.cli profile --config configs/recipes/vit-l-14/general10.yaml model.pretrained=null \
  data.dataset=task_folders "data.root=$OUT/general10-data" data.shots=0 data.train_augment=none \
  data.cache.train_views=0 "data.cache.dir=$OUT/cache" data.num_workers=4 train.progress=false \
  --warmup 5 --steps 20 --out "$OUT/profile-vit-l-14" || true
echo "== written: $OUT/profile-vit-l-14/profile.md"

#!/usr/bin/env bash
# A wheel built from the checkout, installed into a clean virtual environment outside it: the CLI answers
# and a short synthetic job trains. Config files stay in the checkout (a wheel ships the package, its
# model configs and the micro world's entry points); the job names its config file by path.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$repo/.venv/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" "$repo"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q "$work"/dist/softcpt_dist-*.whl
cd "$work"
"$work/venv/bin/softcpt-dist" --help > /dev/null
"$work/venv/bin/python" -c "import softcpt_dist, sys; assert softcpt_dist.__file__.startswith('$work/venv'), softcpt_dist.__file__"
"$work/venv/bin/softcpt-dist" train --config "$repo/configs/synthetic.yaml" optim.epochs=2 train.progress=false \
    data.root="$work/data" train.output_dir="$work/runs" train.run_name=wheel
test -f "$work/runs/wheel/results.json"
echo "wheel check: OK"

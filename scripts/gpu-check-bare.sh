#!/bin/bash
# `streamdiff gpu-check` on a CUDA image that has torch and triton but not this project's other
# dependencies (a PyTorch container, a machine with no package registry), without installing the
# project: the package is laid out in a temporary folder as its wheel would be, diffusers comes
# from $WHEELS/*.whl (or pip, where it is missing and a registry answers), a 20 s tiny-model run on
# CUDA checks the setup before the budget starts, and gpu-check hands pytest only the files with
# gpu tests (the server's aiortc / av are not needed). Everything it prints lands in OUT_DIR too.
#
#   scripts/gpu-check-bare.sh [BUDGET_S=600] [OUT_DIR=out/gpu-check] [gpu-check options ...]
#   WHEELS=dir-of-wheels STREAMDIFF_COMMIT=abc1234 scripts/gpu-check-bare.sh 500 /tmp/out --only VAE
set -u
BUDGET=${1:-600}
OUT_DIR=$(realpath -m "${2:-out/gpu-check}")
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu tries the setup on a machine without a GPU (gpu-check then refuses)
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/console.log") 2>&1
t0=$(date +%s)
elapsed() { echo "$(($(date +%s) - t0)) s"; }
echo "== $(date -u +%FT%TZ) $(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)" || exit 2
site=$(mktemp -d) pkg=$(mktemp -d)
if ls "${WHEELS:-/nonexistent}"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$WHEELS"/*.whl || exit 3
elif ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-deps --target "$site" diffusers || exit 3
fi
cp -r streamdiff "$pkg/" && cp -r kernels server client "$pkg/streamdiff/" || exit 4
export STREAMDIFF_CONFIG_DIR=$PWD/configs PYTHONPATH=$pkg:$site PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
export STREAMDIFF_COMMIT=${STREAMDIFF_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}
python3 -c "import streamdiff.kernels, streamdiff.model.causal_wan" || exit 5
echo "== preflight: the tiny model on $DEVICE ($(elapsed))"
timeout 150 python3 -m streamdiff.cli bench --config tiny --random-weights --duration 2 --steps 1 --streams 1 \
  --set "runtime.device=$DEVICE" 2>&1 | tr '\r' '\n' | grep -v "%|" | tail -4
[ "${PIPESTATUS[0]}" = 0 ] || { echo "preflight failed: nothing measured"; exit 6; }
echo "== gpu-check, budget $BUDGET s ($(elapsed))"
python3 -m streamdiff.cli gpu-check --out "$OUT_DIR" --budget-s "$BUDGET" "${@:3}"
rc=$?
echo "== done, rc $rc ($(elapsed))"
exit $rc

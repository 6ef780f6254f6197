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
#
# BUDGET_S is the whole script's wall time: setup and the preflight are paid out of it, and
# gpu-check gets what is left less EXIT_MARGIN_S (default 15 s: writing the report, CUDA and
# inductor teardown). Give the command a limit of at least BUDGET_S + 10.
# PREFLIGHT=0 skips the tiny-model run (its ~20-40 s go to gpu-check instead).
# DEVICE=cpu tries the setup on a machine without a GPU: the preflight runs on the CPU and
# gpu-check prints its plan for the budget that is left (--dry-run) instead of refusing.
set -u
BUDGET=${1:-600}
OUT_DIR=$(realpath -m "${2:-out/gpu-check}")
DEVICE=${DEVICE:-cuda}
PREFLIGHT=${PREFLIGHT:-1}
EXIT_MARGIN_S=${EXIT_MARGIN_S:-15}
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/console.log") 2>&1
t0=$(date +%s)
elapsed() { echo "$(($(date +%s) - t0)) s"; }
echo "== $(date -u +%FT%TZ) $(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)" 2>/dev/null \
  || { echo "gpu-check-bare: $(command -v python3 || echo python3) cannot import torch and triton (the GPU image must have both)" >&2; exit 2; }
site=$(mktemp -d) pkg=$(mktemp -d)
if [ -n "${WHEELS:-}" ]; then  # named: its wheels or nothing (a folder left out of `carry` arrives empty or missing)
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "WHEELS=$WHEELS holds no .whl here (not carried?)"; exit 3; }
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$WHEELS"/*.whl || exit 3
elif ! python3 -c "import diffusers" 2>/dev/null; then  # a registry, if one answers: bounded, no retries
  echo "diffusers is missing and no WHEELS given: trying pip (fails in ~20 s without a registry)"
  timeout 120 python3 -m pip install -q --no-deps --retries 0 --timeout 10 --target "$site" diffusers || exit 3
fi
cp -r streamdiff "$pkg/" && cp -r kernels server client "$pkg/streamdiff/" || exit 4
export STREAMDIFF_CONFIG_DIR=$PWD/configs PYTHONPATH=$pkg:$site PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
export STREAMDIFF_COMMIT=${STREAMDIFF_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}
python3 -c "import streamdiff.kernels, streamdiff.model.causal_wan, streamdiff.bench.gpu_check, streamdiff.cli" || exit 5
if [ "$PREFLIGHT" != 0 ]; then
  echo "== preflight: the tiny model on $DEVICE ($(elapsed)); log preflight.log"
  timeout 150 python3 -m streamdiff.cli bench --config tiny --random-weights --duration 2 --steps 1 --streams 1 \
    --set "runtime.device=$DEVICE" 2>&1 | tr '\r' '\n' | grep -v "%|" > "$OUT_DIR/preflight.log"
  rc=${PIPESTATUS[0]}
  tail -n $([ "$rc" = 0 ] && echo 4 || echo 30) "$OUT_DIR/preflight.log"
  [ "$rc" = 0 ] || { echo "preflight failed (rc $rc): nothing measured"; exit 6; }
fi
left=$((BUDGET - $(date +%s) + t0 - EXIT_MARGIN_S))
[ "$left" -ge 60 ] || { echo "only $left s of the $BUDGET s budget left for gpu-check: nothing measured"; exit 7; }
dry=()
[ "$DEVICE" = cuda ] || dry=(--dry-run)
echo "== gpu-check, budget $left s of $BUDGET ($(elapsed))"
python3 -m streamdiff.cli gpu-check --out "$OUT_DIR" --budget-s "$left" "${@:3}" ${dry[@]+"${dry[@]}"}
rc=$?
echo "== done, rc $rc ($(elapsed))"
exit $rc

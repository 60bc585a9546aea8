#!/usr/bin/env bash
# GPU check in under 8 minutes on one H100/H200: the `-m gpu` tests, then plain diffusers fp16 against our
# default CUDA path (eager, and torch.compile with CUDA graphs) on the SD 1.5-shaped model (random weights,
# built locally), 512x512, batch 1, CFG 7.5, 20 steps: it/s, s/image, peak memory, PSNR against fp32.
# Needs torch, diffusers, transformers and safetensors (pytest for the tests; skipped without it), no gradio.
#   scripts/gpu_check.sh                   # PYTHON=/path/to/python to choose the interpreter
#   scripts/gpu_check.sh --no-compile      # extra arguments go to scripts/gpu_check.py
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
TOTAL=${GPU_CHECK_SECONDS:-460}  # everything, with margin under 8 minutes
start=$(date +%s)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

echo "== -m gpu tests (at most 150 s)"
if "$PY" -c "import pytest" 2>/dev/null; then
    timeout 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_path.py tests/test_speed.py
    echo "gpu tests: exit status $?"
else
    echo "gpu tests: skipped (pytest is not installed)"
fi

left=$(( TOTAL - ($(date +%s) - start) ))
echo "== benchmark (at most ${left} s)"
timeout "$left" "$PY" scripts/gpu_check.py --budget $(( left - 60 )) "$@"
status=$?
[ "$status" -eq 124 ] && echo "benchmark: stopped at its time limit (${left} s); the lines above are what it measured"
echo "gpu_check.sh: $(( $(date +%s) - start )) s in all"
exit "$status"

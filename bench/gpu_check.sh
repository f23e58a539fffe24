#!/usr/bin/env bash
# One-GPU check of deepnets: ResNet-18 images/s (fp32, bf16-mixed, + channels_last,
# + torch.compile), MLP steps/s and a host-sync check, printed as one table.
# Under 5 minutes on one H100, then the autodiff experiment's cheap-gradient rows on the GPU (--quick,
# at most 2 min), and the stacked-sweep row (bench/stacked.py --gpu-row, at most 3 min).
# Run from anywhere: `bash bench/gpu_check.sh [--cpu-smoke]`.
# Writes $OUT/gpu_check.json when OUT is set. Without a GPU it says so and exits 0.
# Environment: PYTHON (interpreter to use), GPU_CHECK_BUDGET_S (default 270).
set -uo pipefail
cd "$(dirname "$0")/.."

pick_python() {
  if [[ -n ${PYTHON:-} ]]; then echo "$PYTHON"; return; fi
  # the first interpreter that has torch and lightning: the system one on a GPU box,
  # this checkout's venv on a laptop
  for py in python3 .venv/bin/python python; do
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import torch, lightning' >/dev/null 2>&1; then
      echo "$py"; return
    fi
  done
  echo "gpu_check: no python with torch and lightning found (set PYTHON=...)" >&2
  exit 2
}
PY=$(pick_python)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# A fresh inductor cache, so the compile row reports the cold one-time cost a first run pays.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$(mktemp -d /tmp/deepnets_inductor.XXXXXX)}
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null | sed 's/^/nvidia-smi: /'
fi
# A hard stop a little above the script's own budget, so a wedged run cannot hang the caller.
limit=295; for a in "$@"; do [[ $a == --cpu-smoke ]] && limit=3700; done
timeout --signal=INT --kill-after=20 "${GPU_CHECK_TIMEOUT_S:-$limit}" "$PY" bench/gpu_check.py "$@"
rc=$?
# The cheap-gradient principle on the GPU (issue 19): forward+backward over forward time and flops for every
# block of the zoo, as the CPU table in the README (`python -m deepnets.experiments autodiff`).
if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: autodiff --quick --device cuda (cheap-gradient rows on the GPU)"
  timeout --signal=INT --kill-after=10 120 "$PY" -m deepnets.experiments autodiff --quick --device cuda \
    --out "${OUT:-$(mktemp -d /tmp/deepnets_gpu_autodiff.XXXXXX)}" || rc=$?
  # stacked sweeps (issue 20): members/s of 64 stacked 2x64 MLPs against 64 sequential runs
  echo "gpu_check: stacked row (bench/stacked.py --gpu-row)"
  timeout --signal=INT --kill-after=10 180 "$PY" bench/stacked.py --gpu-row \
    ${OUT:+--json "$OUT/stacked_gpu.json"} || rc=$?
fi
# Exact metrics on the GPU (issue 15): a short digits run through train() at precision 32 and bf16-mixed,
# val/test loss and accuracy from callback_metrics, metrics.json and --evaluate against the model applied by
# hand (float64 sums), one PASS/FAIL row each; a FAIL makes this script exit non-zero.
if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: exact_metrics --device cuda (reported metrics vs the model applied by hand)"
  timeout --signal=INT --kill-after=10 240 "$PY" bench/exact_metrics.py --device cuda || rc=$?
else
  echo "gpu_check: exact_metrics skipped (no GPU visible to torch; bench/exact_metrics.py --device cpu runs it here)"
fi
exit "$rc"

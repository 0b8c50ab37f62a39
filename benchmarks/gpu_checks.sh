#!/usr/bin/env bash
# Every check that needs a GPU, in one call (for the few sessions that are lent one):
# precisions end to end (fit, validate, sample; fp16-mixed and bf16-mixed, routers that skip),
# then the speed report on the device. Writes its logs under ${OUT:-gpu_checks}.
#   bash benchmarks/gpu_checks.sh
set -uo pipefail
out="${OUT:-gpu_checks}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
python -m pytest -q tests/test_reliability.py -k "gpu or cuda" -rs 2>&1 | tee "$out/precisions.log"
status=${PIPESTATUS[0]}
echo "precision checks exit status: $status"
exit "$status"

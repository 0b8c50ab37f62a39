#!/usr/bin/env bash
# Every check that needs a GPU, in one call (for the few sessions that are lent one):
# precisions end to end (fit, validate, sample; fp16-mixed and bf16-mixed, routers that skip),
# then the speed reports on the device: the untrained pair at the paper's shape and, given the
# checkpoints of a trained pair, that pair. Writes its logs under ${OUT:-gpu_checks}.
#   DENSE_CKPT=... TSA_CKPT=... TSA_DATA_DIR=../shared/data bash benchmarks/gpu_checks.sh
# (the checkpoints are the pair the CPU speed report used, of configs/shapes/regime.yaml; without them
# that report is skipped)
set -uo pipefail
out="${OUT:-gpu_checks}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
python -m pytest -q tests/test_reliability.py -k "gpu or cuda" -rs 2>&1 | tee "$out/precisions.log"
status=${PIPESTATUS[0]}
echo "precision checks exit status: $status"
python benchmarks/speed.py --device cuda --config configs/shapes/paper.yaml --skip 0.3 \
    --out "$out/speed_cuda_paper.json" 2>&1 | tee "$out/speed_paper.log"
status=$(( status || PIPESTATUS[0] ))
if [[ -n "${DENSE_CKPT:-}" && -n "${TSA_CKPT:-}" ]]; then
    python benchmarks/speed.py --device cuda --dense "$DENSE_CKPT" --tsa "$TSA_CKPT" \
        --config configs/shapes/regime.yaml --out "$out/speed_cuda.json" 2>&1 | tee "$out/speed.log"
    status=$(( status || PIPESTATUS[0] ))
fi
exit "$status"

#!/usr/bin/env bash
# GPU device benchmark (issue 7): run on the lent GPU machine from the repository root;
# writes JSON into $OUT (default benchmarks/results/gpu), to be committed with the
# device's name. Never run yet: no GPU has been lent to this project so far.
#
# Built so far:  CUDA pre/post kernel throughput vs device copy bandwidth (kernels.py)
# Still to build: model-only vs end-to-end Mpx/s on a 20k² image with --device cuda,
#                 GPU busy fraction, stage breakdown, MONAI sliding window on the same GPU.
set -euo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
# the device image has torch, cupy and numba-cuda; segloop itself goes in without deps
python -m pip install --quiet --no-deps --no-build-isolation -e . >/dev/null
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.csv"
python benchmarks/gpu/kernels.py --out "$OUT"
echo "run_all.sh: model-only / end-to-end / MONAI on GPU are not built yet (see issue 7)" >&2

#!/usr/bin/env bash
# GPU device benchmark (issue 7): run on the lent GPU machine from the repository root,
# with the wheels of benchmarks/gpu/wheels.sh carried along; writes JSON + markdown into
# $OUT (default benchmarks/results/gpu), to be committed with the device's name.
# Never run yet: no GPU has been lent to this project so far.
#
#   1. CUDA pre/post kernel throughput vs device copy bandwidth (kernels.py)
#   2. end-to-end vs model-only vs MONAI sliding window, same float16 torch module on the
#      GPU, 20480² image (segloop bench segment --runtime torch --device cuda), with the
#      stage breakdown; pre/post still run on the CPU in this pipeline
# Still to build: the device-resident pipeline (CUDA kernels between decode and the model,
# streams, pinned double buffers) and the GPU busy fraction.
set -euo pipefail
OUT=${OUT:-benchmarks/results/gpu}
SIZE=${SIZE:-20480}
mkdir -p "$OUT"
if [ -d benchmarks/gpu/wheels ]; then
    python -m pip install --quiet --no-index --no-deps benchmarks/gpu/wheels/*.whl
fi
# segloop itself without its deps (torch, numba, onnxruntime are the machine's own)
python -m pip install --quiet --no-deps --no-build-isolation -e . >/dev/null
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.csv"
python benchmarks/gpu/kernels.py --out "$OUT"
python -m segloop bench segment --size "$SIZE" --runtime torch --device cuda --no-rss \
    --threads "$(nproc)" --batch 8 --save "$OUT" --quiet > "$OUT/segment_stdout.json"

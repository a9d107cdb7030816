#!/usr/bin/env bash
# Gather, on a machine that reaches PyPI, the wheels the lent GPU machine lacks for
# run_all.sh. That machine has Python 3.12 (python3) with torch 2.11 + CUDA 13, cupy,
# numba-cuda, onnx, onnxruntime (CPU), scipy, scikit-image, tifffile, rich, psutil,
# pyyaml, packaging, typing-extensions, aiohttp; it lacks zarr 3, zarrs (the write stage's
# codec pipeline) and what zarr imports
# (numcodecs, donfig, google-crc32c: zarr 3 imports `google_crc32c`, not `crc32c`),
# msgspec (segloop's manifest) and monai (the peer). Versions = this project's venv.
# They go to benchmarks/gpu/wheels/ (ignored by git) and travel with the run
# (carry: ["benchmarks/gpu/wheels"]); run_all.sh installs only those whose module does
# not import there, with `pip --target` into a scratch folder (never over the image's
# own packages). The whole tree + wheels must stay under 64 MiB; this prints the size.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
rm -rf wheels && mkdir wheels
"$PY" -m pip download --quiet --dest wheels --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 \
    zarr==3.1.6 zarrs==0.2.3 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 \
    msgspec==0.23.0 monai==1.6.0
du -sh wheels
ls wheels

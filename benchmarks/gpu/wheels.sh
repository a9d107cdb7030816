#!/usr/bin/env bash
# Gather, on a machine that reaches PyPI, the wheels the lent GPU machine lacks for
# run_all.sh (it has Python 3.12, torch + CUDA, cupy, numba-cuda, onnxruntime, aiohttp,
# pytest-benchmark and reaches no registry). They go to benchmarks/gpu/wheels/ (ignored by
# git), to be carried with the run (`carry: ["benchmarks/gpu/wheels"]`, 64 MiB at most).
set -euo pipefail
cd "$(dirname "$0")"
rm -rf wheels && mkdir wheels
# what segloop's segment path and the MONAI comparison import, with zarr 3's own needs,
# at the versions the project's venv holds (crc32c: any)
pip download --quiet --dest wheels --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 --implementation cp --no-deps \
    zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 crc32c typing-extensions==4.16.0 \
    packaging==26.4 pyyaml==6.0.4 tifffile==2026.3.3 imagecodecs==2026.3.6 onnx==1.23.2 \
    protobuf==6.33.6 msgspec==0.23.0 psutil==7.2.2 rich==15.0.0 markdown-it-py==4.3.0 \
    mdurl==0.1.2 pygments==2.21.0 monai==1.6.0
du -sh wheels

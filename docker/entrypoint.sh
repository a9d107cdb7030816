#!/usr/bin/env bash
# Build TensorRT plans for this GPU if none match, then serve the repository with the
# TensorRT config of segloop_unet (model_repository/segloop_unet/configs/tensorrt.pbtxt).
set -euo pipefail
python -m segloop.runtimes.tensorrt_plans /models
exec tritonserver --model-repository=/models --model-config-name=tensorrt \
    --allow-metrics=true "$@"

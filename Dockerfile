# segloop on the official Triton server image (GPU): TensorRT for the network, the
# segloop python-backend models for pre/post, the same `segloop` ensemble as on CPU.
# Not built or run on the project's machines (no access to nvcr.io, no GPU): see README.
#
#   docker build -t segloop-triton .
#   docker run --gpus=1 --shm-size=1g -p 8000-8002:8000-8002 segloop-triton
FROM nvcr.io/nvidia/tritonserver:25.01-py3

# Ubuntu 24.04 image: python 3.12, PEP 668 -> a venv the python backend stub can use
ENV VIRTUAL_ENV=/opt/segloop PATH=/opt/segloop/bin:$PATH
WORKDIR /opt/src
COPY pyproject.toml constraints.txt README.md ./
COPY server/ server/
COPY kernels/ kernels/
COPY model_repository/ model_repository/
COPY review_ui/ review_ui/
RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install --no-cache-dir -c constraints.txt . "tensorrt-cu12==10.8.*" cupy-cuda12x

COPY model_repository/ /models/
COPY docker/entrypoint.sh /usr/local/bin/segloop-entrypoint
EXPOSE 8000 8001 8002
ENTRYPOINT ["/usr/local/bin/segloop-entrypoint"]

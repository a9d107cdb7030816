"""TensorRT on a CUDA GPU (``--runtime tensorrt``), written against TensorRT 10's Python API.

The engine (fp16, dynamic batch/window profile) is built from the same ONNX file on first
use and cached beside it as ``model.plan``, stamped with the GPU name and TensorRT
version (``segloop.triton.engines``), so a plan is rebuilt only for another GPU or
TensorRT. I/O buffers are torch CUDA tensors; ``run`` takes and returns host arrays (the
device-resident pipeline passes device tensors through ``run_device``).

TensorRT cannot be installed on the machines this project is developed on: this runtime
has not run there, and its test is skipped with that reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segloop.errors import UserError
from segloop.runtimes.base import Runtime


class TensorRTRuntime(Runtime):
    name = "tensorrt"

    def __init__(self, model_path: Path, threads: int) -> None:
        super().__init__(model_path, threads)
        try:
            import tensorrt as trt
            import torch
        except ImportError as exc:
            raise UserError(
                f"runtime 'tensorrt' needs the tensorrt package and a CUDA GPU ({exc.name} missing)"
            ) from exc
        if not torch.cuda.is_available():
            raise UserError("runtime 'tensorrt' needs a CUDA GPU; none is visible")
        from segloop.triton.engines import ensure_plan

        plan, _ = ensure_plan(model_path)
        self.torch = torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(plan.read_bytes())
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == mode)
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) != mode)
        self.stream = torch.cuda.Stream()

    def run_device(self, batch):
        """(B, 3, S, S) float32 CUDA tensor → (B, K, S, S) float32 CUDA tensor."""
        torch = self.torch
        batch = batch.contiguous()
        self.context.set_input_shape(self.input, tuple(batch.shape))
        shape = tuple(self.context.get_tensor_shape(self.output))
        out = torch.empty(shape, dtype=torch.float32, device=batch.device)
        self.context.set_tensor_address(self.input, batch.data_ptr())
        self.context.set_tensor_address(self.output, out.data_ptr())
        with torch.cuda.stream(self.stream):
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()
        return out

    def run(self, batch: np.ndarray) -> np.ndarray:
        device = self.torch.from_numpy(batch).cuda(non_blocking=True)
        return self.run_device(device).cpu().numpy()

"""TensorRT on a CUDA GPU (``--runtime tensorrt``), written against TensorRT 10's Python API.

The engine (fp16, dynamic batch/window profile) is built from the same ONNX file on first
use and cached beside it as ``model.plan``, stamped with the GPU name and TensorRT
version (``segloop.runtimes.tensorrt_plans``), so a plan is rebuilt only for another GPU or
TensorRT. I/O buffers are torch CUDA tensors; ``run`` takes and returns host arrays (the
device-resident pipeline passes device tensors through ``run_device``).

Streams: upload, engine and download are ordered on the engine's own stream, and a device
batch from the caller's stream is waited for with stream events (``run_device``).

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
        from segloop.runtimes.tensorrt_plans import ensure_plan

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
        self.device = torch.device("cuda", torch.cuda.current_device())
        dtypes = {trt.float32: torch.float32, trt.float16: torch.float16}
        self.in_dtype = dtypes[self.engine.get_tensor_dtype(self.input)]
        self.out_dtype = dtypes[self.engine.get_tensor_dtype(self.output)]

    def run_device(self, batch):
        """(B, 3, S, S) CUDA tensor → (B, K, S, S) CUDA tensor, asynchronously.

        Stream order (the race this fixes: the input used to be copied on the default
        stream while the engine ran on its own, with no wait): the engine's stream first
        waits for the caller's current stream (which produced ``batch``), the engine
        runs there (``execute_async_v3``), then the caller's stream waits for the
        engine's. ``record_stream`` tells torch's caching allocator that ``batch`` is in
        use on the engine's stream and that ``out`` is used on the caller's, so neither
        block is reused early. No host synchronisation.
        """
        torch = self.torch
        caller = torch.cuda.current_stream(self.device)
        engine = self.stream
        engine.wait_stream(caller)
        with torch.cuda.stream(engine):
            x = batch.to(self.in_dtype).contiguous()
            self.context.set_input_shape(self.input, tuple(x.shape))
            shape = tuple(self.context.get_tensor_shape(self.output))
            out = torch.empty(shape, dtype=self.out_dtype, device=self.device)
            self.context.set_tensor_address(self.input, x.data_ptr())
            self.context.set_tensor_address(self.output, out.data_ptr())
            if not self.context.execute_async_v3(engine.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
        x.record_stream(engine)
        batch.record_stream(engine)
        caller.wait_stream(engine)
        out.record_stream(caller)
        return out

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) float32 host batch → (B, K, S, S) float32 host logits: upload,
        engine and download all on the engine's stream (pinned upload)."""
        torch = self.torch
        with torch.cuda.stream(self.stream):
            host = torch.from_numpy(batch).pin_memory()
            device = host.to(self.device, non_blocking=True)
            out = self.run_device(device)
            return out.float().cpu().numpy()  # waits for this stream's work, then copies

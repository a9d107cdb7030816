"""PyTorch, with the weights read from the same ONNX file (one set of weights).

``device="cpu"`` (default): float32, as exported. ``device="cuda"``: float16 weights and
activations in channels_last layout (what Tensor Cores want); the batch goes up pinned and
the logits come back as float32. ``run_device`` keeps both ends on the device (the
device-resident pipeline: the pre kernel's output in, float16 logits out for the post
kernel), and with ``graphs=True`` replays each batch shape as a CUDA graph (captured
once, after a warm-up, at most ``MAX_GRAPHS`` shapes). The CUDA path is written against
torch's documented API and has **not run** on this project's machines (no GPU).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from segloop.errors import UserError
from segloop.model.weights import load_unet
from segloop.runtimes.base import Runtime

DEVICES = ("cpu", "cuda")
#: distinct (B, Sh, Sw) batch shapes captured as CUDA graphs; later shapes run eagerly
MAX_GRAPHS = 4


class TorchRuntime(Runtime):
    name = "torch"

    def __init__(
        self, model_path: Path, threads: int, device: str = "cpu", graphs: bool = False
    ) -> None:
        """graphs: replay ``run_device`` batches as CUDA graphs (CUDA only; ignored on
        the CPU)."""
        super().__init__(model_path, threads)
        if device not in DEVICES:
            raise UserError(f"unknown device {device!r}; choose cpu or cuda")
        if device == "cuda" and not torch.cuda.is_available():
            raise UserError(
                f"--device cuda: torch {torch.__version__} sees no CUDA GPU here; run on a "
                "GPU node with a CUDA build of torch, or leave --device out"
            )
        torch.set_num_threads(threads)
        self.device = torch.device(device)
        model = load_unet(model_path, len(self.card["classes"]))
        if self.device.type == "cuda":
            self.name = "torch-cuda"  # recorded in the store: fp16 output is its own run
            model = model.to(self.device, memory_format=torch.channels_last).half()
        self.model = model
        self.graphs = graphs and self.device.type == "cuda"
        self._graphs: dict[tuple, tuple] = {}  # shape → (graph, static input, static output)
        self._pool = None

    @torch.inference_mode()
    def run(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch)
        if self.device.type == "cpu":
            return self.model(x).numpy()
        x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.half().contiguous(memory_format=torch.channels_last)
        return self.model(x).float().cpu().numpy()

    @torch.inference_mode()
    def run_device(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, Sh, Sw) tensor on this runtime's device, any float dtype and layout →
        (B, K, Sh, Sw) logits there: float16 on CUDA, float32 on the CPU. Runs on the
        caller's current stream; nothing is copied to the host.

        With ``graphs``, the result of a graphed shape is the graph's static output
        buffer: valid until the next call with the same shape (copy it to keep it).
        """
        if self.device.type == "cpu":
            return self.model(x.float())
        if not self.graphs:
            return self.model(x.half().contiguous(memory_format=torch.channels_last))
        key = tuple(x.shape)
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= MAX_GRAPHS:
                return self.model(x.half().contiguous(memory_format=torch.channels_last))
            entry = self._graphs[key] = self._capture(x)
        graph, static_in, static_out = entry
        static_in.copy_(x)  # casts to float16 and lays out channels_last
        graph.replay()
        return static_out

    def _capture(self, x: torch.Tensor) -> tuple:
        """Warm up on a side stream, then capture one forward pass (torch's documented
        whole-network capture recipe); graphs share one memory pool."""
        static_in = torch.empty(x.shape, dtype=torch.float16, device=self.device).contiguous(
            memory_format=torch.channels_last
        )
        static_in.copy_(x)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.model(static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_out = self.model(static_in)
        return graph, static_in, static_out

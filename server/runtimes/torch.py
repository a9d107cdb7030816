"""PyTorch, with the weights read from the same ONNX file (one set of weights).

``device="cpu"`` (default): float32, as exported. ``device="cuda"``: float16 weights and
activations in channels_last layout (what Tensor Cores want); the batch goes up pinned and
the logits come back as float32. The CUDA path is written against torch's documented API
and has **not run** on this project's machines (no GPU): it waits for a lent GPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from segloop.errors import UserError
from segloop.model.unet import UNet
from segloop.runtimes.base import Runtime

DEVICES = ("cpu", "cuda")


def load_unet(model_path: Path, n_classes: int) -> UNet:
    """UNet with the ONNX initializers as its state_dict (names match 1:1, strict)."""
    proto = onnx.load(str(model_path))
    state = {
        t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in proto.graph.initializer
    }
    model = UNet(n_classes=n_classes)
    model.load_state_dict(state, strict=True)
    return model.eval()


class TorchRuntime(Runtime):
    name = "torch"

    def __init__(self, model_path: Path, threads: int, device: str = "cpu") -> None:
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

    @torch.inference_mode()
    def run(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch)
        if self.device.type == "cpu":
            return self.model(x).numpy()
        x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.half().contiguous(memory_format=torch.channels_last)
        return self.model(x).float().cpu().numpy()

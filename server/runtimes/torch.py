"""PyTorch on CPU, with the weights read from the same ONNX file (one set of weights)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from segloop.model.unet import UNet
from segloop.runtimes.base import Runtime


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

    def __init__(self, model_path: Path, threads: int) -> None:
        super().__init__(model_path, threads)
        torch.set_num_threads(threads)
        self.model = load_unet(model_path, len(self.card["classes"]))

    @torch.inference_mode()
    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.model(torch.from_numpy(batch)).numpy()

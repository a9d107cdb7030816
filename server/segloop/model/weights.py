"""segloop's UNet with its weights read from the ONNX file (one set of weights for every
runtime, for finetune and for the benchmarks)."""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from onnx import numpy_helper

from segloop.errors import UserError
from segloop.model.card import is_unet, read_card
from segloop.model.unet import UNet


def load_unet(model_path: Path, n_classes: int) -> UNet:
    """UNet with the ONNX initializers as its state_dict (names match 1:1, strict).
    A model added with ``segloop model add`` (any architecture) is refused: the torch
    runtime has only segloop's own UNet to load weights into (finetune runs added
    models through ``model.onnx_torch``)."""
    if not is_unet(read_card(model_path)):
        raise UserError(
            f"{model_path}: not segloop's UNet (added with `segloop model add`); the torch "
            "runtime runs only the UNet: use --runtime onnx, triton or tensorrt"
        )
    proto = onnx.load(str(model_path))
    state = {
        t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in proto.graph.initializer
    }
    model = UNet(n_classes=n_classes)
    model.load_state_dict(state, strict=True)
    return model.eval()

"""The ``Runtime`` interface and its registry.

A runtime maps a normalised batch (B, 3, S, S) float32 to logits (B, K, S, S) float32,
with S a multiple of the model's downsampling factor. All runtimes load the same ONNX
file (weights and model card) so their outputs agree.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from segloop.errors import UserError
from segloop.model.card import read_card

#: name → "module:class", imported only when chosen
RUNTIMES = {
    "onnx": "segloop.runtimes.onnx:OnnxRuntime",
    "torch": "segloop.runtimes.torch:TorchRuntime",
}


class Runtime(ABC):
    name: str

    def __init__(self, model_path: Path, threads: int) -> None:
        self.model_path = model_path
        self.threads = threads
        self.card = read_card(model_path)

    @abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) float32 → (B, K, S, S) float32 logits."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release sessions/threads (optional)."""


def create_runtime(name: str, model_path: Path, threads: int) -> Runtime:
    if name not in RUNTIMES:
        raise UserError(f"unknown runtime {name!r}; choose one of {', '.join(RUNTIMES)}")
    module, cls = RUNTIMES[name].split(":")
    return getattr(importlib.import_module(module), cls)(model_path, threads)

"""The runtime interfaces and their registry.

A ``Runtime`` maps a normalised batch (B, 3, S, S) float32 to logits (B, K, S, S)
float32, with S a multiple of the model's downsampling factor; the pipeline runs pre and
post around it. A ``TileRuntime`` does all three elsewhere (a Triton ensemble): uint8
windows in, uint8 labels + confidence out, asynchronously. All runtimes use the same
ONNX weights and model card, so their outputs agree.
"""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from segloop.errors import UserError
from segloop.model.card import read_card

#: name → "module:class", imported only when chosen
RUNTIMES = {
    "onnx": "segloop.runtimes.onnx:OnnxRuntime",
    "torch": "segloop.runtimes.torch:TorchRuntime",
    "triton": "segloop.runtimes.triton:TritonRuntime",
    "tensorrt": "segloop.runtimes.tensorrt:TensorRTRuntime",
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


class TileRuntime(ABC):
    """Pre + network + post in one remote call; many calls may be in flight."""

    name: str
    card: dict
    halo: int
    #: requests kept open at once (the pipeline's queue depth for this runtime)
    in_flight: int = 4

    @abstractmethod
    def submit(self, windows: np.ndarray) -> Future:
        """(B, Sh, Sw, C) uint8 windows → Future of (labels, confidence), each
        (B, Sh − 2·halo, Sw − 2·halo) uint8."""

    @abstractmethod
    def close(self) -> None:
        """Release connections and shared memory."""


def device_options(runtime: str, device: str) -> dict[str, str]:
    """Runtime options for ``--device``: none on the CPU; ``cuda`` (and ``sim``, its
    rehearsal in numba's CUDA simulator with torch on the CPU) are for ``torch`` only
    (TensorRT is always on the GPU; ONNX Runtime and Triton pick their device elsewhere)."""
    if device == "cpu":
        return {}
    if runtime != "torch":
        raise UserError(
            f"--device {device} runs --runtime torch (tensorrt is always on the GPU; onnx and "
            "triton choose their device elsewhere)"
        )
    if device == "sim":
        if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
            raise UserError(
                "--device sim runs the CUDA kernels in numba's simulator: set "
                "NUMBA_ENABLE_CUDASIM=1 (a CI rehearsal; slow, use small images)"
            )
        return {}
    return {"device": device}


def create_runtime(name: str, model_path: Path, threads: int, **options) -> Runtime | TileRuntime:
    """The runtime called ``name``; ``options`` go to runtimes that take them (triton: url)."""
    if name not in RUNTIMES:
        raise UserError(f"unknown runtime {name!r}; choose one of {', '.join(RUNTIMES)}")
    module, cls = RUNTIMES[name].split(":")
    try:
        factory = getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        raise UserError(
            f"runtime {name!r} is not installed here ({exc.name} missing); run `make install`"
        ) from exc
    return factory(model_path, threads, **options) if options else factory(model_path, threads)

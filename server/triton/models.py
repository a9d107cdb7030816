"""Python-backend models of the ``segloop`` ensemble (uint8 tiles in → uint8 masks out).

``model_repository/<model>/<version>/model.py`` files are one-line shims that import a
class from here, so every version of a model runs the same code. Imported only inside
Triton's python stub (``triton_python_backend_utils`` exists there).

- ``PreModel``  TILES (B, S, S, C) uint8 → image (B, 3, S, S) float32   [segloop.kernels.pre]
- ``UnetModel`` image → logits (B, K, S, S) float32; ONNX Runtime here, TensorRT where
  installed (``parameters { key: "runtime" }``), weights = the version folder's model.onnx
- ``PostModel`` logits → LABELS, CONFIDENCE (B, S-2h, S-2h) uint8     [segloop.kernels.post]

Tensors stay on the host in this CPU build; on GPU the pre/post steps receive device
tensors (``FORCE_CPU_ONLY_INPUT_TENSORS: no``) and move them with DLPack.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from segloop.kernels.post import labels_confidence
from segloop.kernels.pre import Normalisation, normalise_into


def _params(args: dict) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def _as_numpy(tensor) -> np.ndarray:
    """Host array of an input tensor, through DLPack (zero-copy on the host).

    DLPack rather than ``as_numpy()``: the stub's numpy bridge is built for numpy 1 and
    returns empty arrays under numpy 2; DLPack is also how device tensors travel on GPU.
    """
    if tensor.is_cpu():
        return np.from_dlpack(tensor)
    import cupy  # GPU build only

    return cupy.asnumpy(cupy.from_dlpack(tensor))


def _tensor(name: str, array: np.ndarray):
    """Output tensor from a host array, through DLPack (see ``_as_numpy``)."""
    return pb_utils.Tensor.from_dlpack(name, np.ascontiguousarray(array))


class PreModel:
    """uint8 (B, S, S, C), C ∈ {1, 3, 4} → normalised float32 (B, 3, S, S)."""

    def initialize(self, args: dict) -> None:
        p = _params(args)
        self.mean = tuple(json.loads(p["mean"]))
        self.std = tuple(json.loads(p["std"]))

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            tiles = _as_numpy(pb_utils.get_input_tensor_by_name(request, "TILES"))
            b, s, _, c = tiles.shape
            norm = Normalisation(self.mean, self.std, (0, 0, 0) if c == 1 else (0, 1, 2))
            out = np.empty((b, 3, s, s), np.float32)
            index = np.arange(s, dtype=np.intp)
            for i in range(b):
                normalise_into(tiles[i], index, index, norm, out[i])
            responses.append(pb_utils.InferenceResponse([_tensor("image", out)]))
        return responses


class UnetModel:
    """The network: ONNX Runtime on this version's ``model.onnx`` (TensorRT: ``model.plan``)."""

    def initialize(self, args: dict) -> None:
        from segloop.runtimes import create_runtime

        p = _params(args)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        threads = int(p.get("threads", "0")) or len(os.sched_getaffinity(0))
        self.runtime = create_runtime(p.get("runtime", "onnx"), version_dir / "model.onnx", threads)

    def execute(self, requests: list) -> list:
        # dynamic batching hands several requests at once: one runtime call for all
        arrays = [_as_numpy(pb_utils.get_input_tensor_by_name(r, "image")) for r in requests]
        logits = self.runtime.run(np.concatenate(arrays) if len(arrays) > 1 else arrays[0])
        responses, start = [], 0
        for a in arrays:
            part = logits[start : start + len(a)]
            start += len(a)
            responses.append(pb_utils.InferenceResponse([_tensor("logits", part)]))
        return responses

    def finalize(self) -> None:
        self.runtime.close()


class PostModel:
    """logits (B, K, S, S) → halo cropped LABELS and CONFIDENCE (B, S-2h, S-2h) uint8."""

    def initialize(self, args: dict) -> None:
        self.halo = int(_params(args)["halo"])

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            logits = _as_numpy(pb_utils.get_input_tensor_by_name(request, "logits"))
            core = logits.shape[-1] - 2 * self.halo
            labels, conf = labels_confidence(np.ascontiguousarray(logits), self.halo, core)
            responses.append(
                pb_utils.InferenceResponse([_tensor("LABELS", labels), _tensor("CONFIDENCE", conf)])
            )
        return responses

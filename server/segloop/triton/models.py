"""Python-backend models of the ``segloop`` ensemble (uint8 windows in → uint8 masks out).

``model_repository/<model>/<version>/model.py`` files are one-line shims that import a
class from here, so every version of a model runs the same code. Imported only inside
Triton's python stub (``triton_python_backend_utils`` exists there).

- ``PreModel``  TILES (B, Sh, Sw, C) uint8 → image (B, 3, Sh, Sw) float32 (float16 on GPU)
  [segloop.kernels.pre / pre_cuda]; checks the wire contract (``check_windows``)
- ``UnetModel`` image → logits (B, K, Sh, Sw); ONNX Runtime here; on GPU torch float16
  (``runtime: torch-cuda``) or TensorRT (``runtime: tensorrt``) on device tensors;
  weights = the version folder's model.onnx
- ``PostModel`` logits → LABELS, CONFIDENCE (B, Sh-2h, Sw-2h) uint8 [kernels.post / post_cuda]

**Wire contract** (README, "Serving with Triton"): a request is B ≤ 16 windows of one
shape (Sh, Sw, C), uint8, C ∈ {1, 3, 4}; Sh and Sw multiples of the model's
downsampling factor (8) and larger than 2·halo (halo = 48: the core is what comes back);
each window is the tile core plus ``halo`` px of real context on every side, reflect
padded by the client where it crosses the image border. A window that breaks a rule is
refused with INVALID_ARGUMENT naming the rule, before any work.

On GPU (``configs/gpu.pbtxt``, KIND_GPU instances): pre receives the request's uint8
windows (host or device), uploads them once and normalises on the device into float16;
unet and post take device tensors through DLPack (``FORCE_CPU_ONLY_INPUT_TENSORS: no``),
and only post's uint8 outputs leave the device. That path is written against the
documented python-backend/DLPack API and has **not run** (no GPU tritonserver here).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from segloop.kernels import PARALLEL_LAUNCH
from segloop.kernels import post as post_cpu
from segloop.kernels.pre import Normalisation, normalise_into
from segloop.triton.contract import CHANNELS, check_windows


def _params(args: dict) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def _on_gpu(args: dict) -> bool:
    return args.get("model_instance_kind") == "GPU"


def _invalid(message: str):
    """An INVALID_ARGUMENT response that names the broken rule (no server paths)."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)  # error codes: Triton ≥ 23.08
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def _as_numpy(tensor) -> np.ndarray:
    """Host array of an input tensor, through DLPack (zero-copy on the host).

    DLPack rather than ``as_numpy()``: the stub's numpy bridge is built for numpy 1 and
    returns empty arrays under numpy 2; DLPack is also how device tensors travel on GPU.
    """
    if tensor.is_cpu():
        return np.from_dlpack(tensor)
    import cupy  # GPU build only

    return cupy.asnumpy(cupy.from_dlpack(tensor))


def _tensor(name: str, array):
    """Output tensor from a host (numpy) or device (CuPy, torch CUDA) array via DLPack."""
    if isinstance(array, np.ndarray):
        array = np.ascontiguousarray(array)
    return pb_utils.Tensor.from_dlpack(name, array)


def _device(tensor):
    """A CuPy array of an input tensor, on the GPU (uploaded if it came on the host)."""
    import cupy

    if tensor.is_cpu():
        return cupy.asarray(np.from_dlpack(tensor))
    return cupy.from_dlpack(tensor)


def _numba_stream():
    """CuPy's current stream as a numba stream (0: the legacy default stream), so the
    kernels run in order with the CuPy work around them."""
    import cupy
    from numba import cuda

    ptr = cupy.cuda.get_current_stream().ptr
    return cuda.external_stream(ptr) if ptr else 0


class PreModel:
    """uint8 (B, Sh, Sw, C), C ∈ {1, 3, 4} → normalised (B, 3, Sh, Sw): float32 on the CPU,
    float16 on the GPU (one ``pre_cuda.normalise_windows`` launch per request)."""

    def initialize(self, args: dict) -> None:
        p = _params(args)
        self.mean = tuple(json.loads(p["mean"]))
        self.std = tuple(json.loads(p["std"]))
        self.halo = int(p["halo"])
        self.multiple = int(p["multiple_of"])
        self.gpu = _on_gpu(args)

    def _norm(self, c: int) -> Normalisation:
        return Normalisation(self.mean, self.std, CHANNELS[c])

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, "TILES")
            shape = tuple(tensor.shape())
            rule = check_windows(shape, self.halo, self.multiple)
            if rule:
                responses.append(_invalid(rule))
                continue
            out = self._gpu(tensor, shape) if self.gpu else self._cpu(tensor, shape)
            responses.append(pb_utils.InferenceResponse([_tensor("image", out)]))
        return responses

    def _cpu(self, tensor, shape) -> np.ndarray:
        b, sh, sw, c = shape
        tiles = _as_numpy(tensor)
        norm = self._norm(c)
        out = np.empty((b, 3, sh, sw), np.float32)
        rows, cols = np.arange(sh, dtype=np.intp), np.arange(sw, dtype=np.intp)
        for i in range(b):
            normalise_into(tiles[i], rows, cols, norm, out[i])
        return out

    def _gpu(self, tensor, shape):
        """The batch as one (B·Sh, Sw, C) region; window b's rows are b·Sh + 0..Sh."""
        import cupy

        from segloop.kernels import pre_cuda

        b, sh, sw, c = shape
        region = _device(tensor).reshape(b * sh, sw, c)
        rows = cupy.arange(b * sh, dtype=cupy.int32).reshape(b, sh)
        cols = cupy.tile(cupy.arange(sw, dtype=cupy.int32), (b, 1))
        out = cupy.empty((b, 3, sh, sw), cupy.float16)
        stream = _numba_stream()
        pre_cuda.normalise_windows(region, rows, cols, self._norm(c), out, stream)
        return out


class UnetModel:
    """The network on this version's ``model.onnx``: ONNX Runtime on the host, or torch
    float16 / TensorRT on device tensors (``parameters { key: "runtime" }``)."""

    def initialize(self, args: dict) -> None:
        from segloop.runtimes import create_runtime

        p = _params(args)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        threads = int(p.get("threads", "0")) or len(os.sched_getaffinity(0))
        self.kind = p.get("runtime", "onnx")
        model = version_dir / "model.onnx"
        if self.kind == "torch-cuda":
            self.runtime = create_runtime("torch", model, threads, device="cuda")
        else:
            self.runtime = create_runtime(self.kind, model, threads)

    def execute(self, requests: list) -> list:
        # dynamic batching hands several requests at once: one runtime call for all
        tensors = [pb_utils.get_input_tensor_by_name(r, "image") for r in requests]
        if self.kind in ("torch-cuda", "tensorrt"):
            logits, sizes = self._device(tensors)
        else:
            arrays = [_as_numpy(t) for t in tensors]
            logits = self.runtime.run(np.concatenate(arrays) if len(arrays) > 1 else arrays[0])
            sizes = [len(a) for a in arrays]
        responses, start = [], 0
        for n in sizes:
            part = logits[start : start + n]
            start += n
            responses.append(pb_utils.InferenceResponse([_tensor("logits", part)]))
        return responses

    def _device(self, tensors: list):
        """float16 device logits for device inputs (torch, channels_last, no host copy)."""
        import torch

        xs = [torch.from_dlpack(t.to_dlpack()).cuda() for t in tensors]
        x = torch.cat(xs) if len(xs) > 1 else xs[0]
        with torch.inference_mode():
            if self.kind == "tensorrt":
                y = self.runtime.run_device(x).half()
            else:
                y = self.runtime.model(x.half().contiguous(memory_format=torch.channels_last))
        return y.contiguous(), [len(v) for v in xs]

    def finalize(self) -> None:
        self.runtime.close()


def labels_confidence(logits: np.ndarray, halo: int) -> tuple[np.ndarray, np.ndarray]:
    """logits (B, K, Sh, Sw) → labels, confidence (B, Sh-2h, Sw-2h) uint8 (the CPU post
    kernel, which takes any core shape; ``post.labels_confidence`` is square-only)."""
    b, _, sh, sw = logits.shape
    labels = np.empty((b, sh - 2 * halo, sw - 2 * halo), np.uint8)
    confidence = np.empty_like(labels)
    with PARALLEL_LAUNCH:
        post_cpu._labels_confidence(np.ascontiguousarray(logits), halo, labels, confidence)
    return labels, confidence


class PostModel:
    """logits (B, K, Sh, Sw) → halo cropped LABELS and CONFIDENCE (B, Sh-2h, Sw-2h) uint8."""

    def initialize(self, args: dict) -> None:
        self.halo = int(_params(args)["halo"])
        self.gpu = _on_gpu(args)

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, "logits")
            if self.gpu:
                labels, conf = self._gpu(tensor)
            else:
                labels, conf = labels_confidence(_as_numpy(tensor), self.halo)
            responses.append(
                pb_utils.InferenceResponse([_tensor("LABELS", labels), _tensor("CONFIDENCE", conf)])
            )
        return responses

    def _gpu(self, tensor):
        """One ``post_cuda.windows_into`` launch: the batch's cores stacked as one
        (B·h, w) buffer, window b at (b·h, 0)."""
        import cupy

        from segloop.kernels import post_cuda

        logits = _device(tensor)
        b, _, sh, sw = logits.shape
        h, w = sh - 2 * self.halo, sw - 2 * self.halo
        labels = cupy.empty((b * h, w), cupy.uint8)
        conf = cupy.empty((b * h, w), cupy.uint8)
        origins = cupy.stack([cupy.arange(b, dtype=cupy.int32) * h, cupy.zeros(b, cupy.int32)], 1)
        sizes = cupy.tile(cupy.asarray([h, w], cupy.int32), (b, 1))
        stream = _numba_stream()
        post_cuda.windows_into(logits, self.halo, origins, sizes, labels, conf, stream)
        return labels.reshape(b, h, w), conf.reshape(b, h, w)

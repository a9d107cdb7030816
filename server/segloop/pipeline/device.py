"""The device stages: pre → model → post on the GPU, with only uint8 crossing PCIe.

For ``segment --runtime torch --device cuda``. Three stages replace pre/infer/post:

- ``upload``: the shard's decoded region (uint8/uint16 HWC) into a pinned slot of a ring
  (``RING`` slots), then host → device on the copy stream; an event marks it landed.
- ``device``: on the compute stream, after that event: per batch one pre launch (windows
  cut from the device region by index maps, normalised, float16 NCHW), the model
  (``TorchRuntime.run_device``, fp16 channels_last, CUDA graphs with ``--graphs``), one
  post launch writing uint8 labels and confidence into the slot's device shard buffers;
  then the per-tile uncertainty; then device → host of those bytes on a second copy
  stream into the slot's pinned buffers.
- ``download``: waits for that copy, hands numpy arrays to the writers, frees the slot.

Python touches one item per shard and one per batch, never a pixel. Device memory is the
ring (3 × (region + 2 shard bytes)), the pre buffers per window shape and the model's
activations: bounded by the shard, not the image. GPU busy = Σ (compute stream end − start
event per shard) ÷ wall time.

``device="sim"`` rehearses the same chain on the CPU: numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``) runs the same kernels, torch runs on the CPU in float32, and
streams/events are the simulator's (its timings are not real: GPU busy is None).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from segloop.kernels.pre import Normalisation
from segloop.pipeline.read import ShardWork, batches
from segloop.pipeline.stages import Stage, StageSet, in_flight_for
from segloop.tiling import TileGrid

#: shards in flight on the device (upload of n+1 ‖ compute of n ‖ download of n−1)
RING = 3


@dataclass
class _Slot:
    """One shard's buffers: region (flat, pinned host + device), labels/confidence/
    uncertainty on the device (``post``) and pinned on the host, and its events."""

    region_host: Any
    region_dev: Any
    post: Any
    labels_host: Any
    confidence_host: Any
    uncertainty_host: Any
    uploaded: Any = None
    started: Any = None
    computed: Any = None
    downloaded: Any = None
    shape: tuple[int, int] = (0, 0)


class DeviceStages(StageSet):
    """upload → device → download for one job (see the module docstring).

    rt: a ``TorchRuntime`` (device cuda, or cpu for ``sim``); grid: the job's grid;
    norm: the source's normalisation; batch: windows per model call; channels, dtype:
    the source's (the region's last axis and dtype).
    """

    def __init__(
        self,
        rt,
        grid: TileGrid,
        norm: Normalisation,
        batch: int,
        channels: int,
        dtype: np.dtype,
        device: str = "cuda",
        batch_pixels: int = 4 * 608 * 608,
    ) -> None:
        import torch
        from numba import cuda

        from segloop.kernels.post_cuda import ShardPost

        self.cuda, self.torch, self.sim = cuda, torch, device == "sim"
        self.rt, self.grid, self.norm, self.batch = rt, grid, norm, batch
        self.in_flight = in_flight_for(grid.window_core + 2 * grid.halo, batch, batch_pixels)
        self.copy_in, self.compute, self.copy_out = cuda.stream(), cuda.stream(), cuda.stream()
        self.dtype = np.float32 if self.sim else np.float16
        side = grid.shard + 2 * grid.halo
        region_elems = side * side * channels
        s = grid.shard
        self._free: queue.Queue[_Slot] = queue.Queue()
        for _ in range(RING):
            post = ShardPost((s, s), grid.tile, batch, stream=self.compute)
            tiles = post.uncertainty.shape
            self._free.put(
                _Slot(
                    region_host=cuda.pinned_array(region_elems, dtype),
                    region_dev=cuda.device_array(region_elems, dtype, stream=self.copy_in),
                    post=post,
                    labels_host=cuda.pinned_array((s, s), np.uint8),
                    confidence_host=cuda.pinned_array((s, s), np.uint8),
                    uncertainty_host=cuda.pinned_array(tiles, np.float32),
                )
            )
        self._normalisers: dict[tuple[int, int], Any] = {}
        self._busy_ms = 0.0
        self._lock = threading.Lock()

    # -- the three stages ------------------------------------------------------------

    def upload(self, work: ShardWork) -> list:
        slot = self._free.get()  # blocks while RING shards are on the device
        n = work.region.size
        host = slot.region_host[:n]
        host[:] = work.region.reshape(-1)
        slot.region_dev[:n].copy_to_device(host, stream=self.copy_in)
        slot.uploaded = self._event(self.copy_in)
        return [(work, slot)]

    def device(self, item: tuple) -> list:
        from segloop.kernels.pre_cuda import WindowNormaliser

        work, slot = item
        h, w = work.box[1] - work.box[0], work.box[3] - work.box[2]
        slot.shape = (h, w)
        slot.uploaded.wait(self.compute)
        slot.started = self._event(self.compute)
        region = slot.region_dev[: work.region.size].reshape(work.region.shape)
        y0, x0 = work.box[0], work.box[2]
        with self._torch_stream():
            for idx in batches(work, self.batch):
                wins = [work.windows[i] for i in idx]
                shape = (wins[0].sh, wins[0].sw)
                if shape not in self._normalisers:
                    self._normalisers[shape] = WindowNormaliser(
                        self.norm, self.batch, shape, self.dtype, stream=self.compute
                    )
                rows = np.stack([work.maps[i][0] for i in idx]).astype(np.int32)
                cols = np.stack([work.maps[i][1] for i in idx]).astype(np.int32)
                x = self._normalisers[shape](region, rows, cols)
                logits = self.rt.run_device(self._tensor(x))
                origins = np.array([(v.y0 - y0, v.x0 - x0) for v in wins], np.int32)
                sizes = np.array([(v.h, v.w) for v in wins], np.int32)
                slot.post.windows(self._kernel_arg(logits), self.grid.halo, origins, sizes)
        slot.post.finish((h, w))
        slot.computed = self._event(self.compute)
        slot.computed.wait(self.copy_out)
        slot.post.labels.copy_to_host(slot.labels_host, stream=self.copy_out)
        slot.post.confidence.copy_to_host(slot.confidence_host, stream=self.copy_out)
        slot.post.uncertainty.copy_to_host(slot.uncertainty_host, stream=self.copy_out)
        slot.downloaded = self._event(self.copy_out)
        return [(work, slot)]

    def download(self, item: tuple) -> list:
        work, slot = item
        slot.downloaded.synchronize()
        h, w = slot.shape
        t = self.grid.tile
        work.labels = np.array(slot.labels_host[:h, :w])
        work.confidence = np.array(slot.confidence_host[:h, :w])
        work.uncertainty = np.array(slot.uncertainty_host[: -(-h // t), : -(-w // t)])
        if not self.sim:
            with self._lock:
                self._busy_ms += slot.started.elapsed_time(slot.computed)
        self._free.put(slot)
        return [work]

    def stages(self) -> list[Stage]:
        return [
            Stage("upload", self.upload),
            Stage("device", self.device),
            Stage("download", self.download),
        ]

    def gpu_busy(self, wall_s: float) -> float | None:
        """Fraction of the wall time the compute stream was busy (None in the simulator)."""
        if self.sim or wall_s <= 0:
            return None
        return round(self._busy_ms / 1000.0 / wall_s, 4)

    # -- glue between numba device arrays and torch tensors ---------------------------

    def _event(self, stream):
        ev = self.cuda.event()
        ev.record(stream)
        return ev

    def _torch_stream(self):
        """Run torch on the compute stream (numba's stream, wrapped for torch)."""
        if self.sim:
            return contextlib.nullcontext()
        ext = self.torch.cuda.ExternalStream(int(self.compute.handle.value))
        return self.torch.cuda.stream(ext)

    def _tensor(self, a):
        """A torch view of a numba device array (zero copy)."""
        if self.sim:
            return self.torch.from_numpy(np.asarray(a._ary))
        return self.torch.as_tensor(a, device="cuda")

    def _kernel_arg(self, t):
        """The model's output as a kernel argument (zero copy)."""
        return t.numpy() if self.sim else t.detach()

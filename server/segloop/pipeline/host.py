"""The host stages: pre → infer → post with the CPU kernels (or through a remote
runtime), for one job. ``device.DeviceStages`` is the same stage set on a GPU.

- ``pre``: one shard's windows in batches of the same shape → (B, 3, Sh, Sw) float32
  (``kernels.pre.normalise_windows``), or (B, Sh, Sw, C) uint8 windows for a
  ``TileRuntime`` (Triton: pre, model and post run on the server).
- ``infer``: the runtime on a batch.
- ``post``: each window's core → the shard's (H, W) uint8 labels and confidence
  (``kernels.post.windows_into``); a shard leaves when its last window is in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from segloop.kernels.post import windows_into
from segloop.kernels.pre import Normalisation, normalise_windows
from segloop.pipeline.read import ShardWork, batches
from segloop.pipeline.stages import Stage
from segloop.runtimes import Runtime, TileRuntime
from segloop.tiling import TileGrid


class HostStages:
    """rt: the runtime; norm: the source's normalisation; batch: windows per call;
    buffers(work): gives a shard its label/confidence buffers (``ShardWriter.buffers``)."""

    def __init__(
        self,
        rt: Runtime | TileRuntime,
        grid: TileGrid,
        norm: Normalisation,
        batch: int,
        buffers: Callable[[ShardWork], None],
    ) -> None:
        self.rt, self.grid, self.norm, self.batch, self.buffers = rt, grid, norm, batch, buffers
        self.remote = isinstance(rt, TileRuntime)

    def pre(self, work: ShardWork) -> Iterator[tuple]:
        for idx in batches(work, self.batch):
            rows = np.stack([work.maps[i][0] for i in idx])
            cols = np.stack([work.maps[i][1] for i in idx])
            if self.remote:  # uint8 on the wire: gather the reflect-padded windows only
                arr = work.region[rows[:, :, None], cols[:, None, :]]
            else:
                arr = np.empty((len(idx), 3, rows.shape[1], cols.shape[1]), np.float32)
                normalise_windows(work.region, rows, cols, self.norm, arr)
            yield work, idx, arr

    def infer(self, item: tuple) -> list:
        work, idx, arr = item
        return [(work, idx, self.rt.submit(arr) if self.remote else self.rt.run(arr))]

    def post(self, item: tuple) -> list:
        work, idx, out = item
        if work.labels is None:
            self.buffers(work)
            work.pending = len(work.windows)
        wins = [work.windows[i] for i in idx]
        y0, x0 = work.box[0], work.box[2]
        origins = np.array([(w.y0 - y0, w.x0 - x0) for w in wins], np.intp)
        sizes = np.array([(w.h, w.w) for w in wins], np.intp)
        if self.remote:
            labels, conf = out.result()
            for (oy, ox), (h, w), lab, cf in zip(origins, sizes, labels, conf, strict=True):
                work.labels[oy : oy + h, ox : ox + w] = lab[:h, :w]
                work.confidence[oy : oy + h, ox : ox + w] = cf[:h, :w]
        else:
            windows_into(out, self.grid.halo, origins, sizes, work.labels, work.confidence)
        work.pending -= len(idx)
        return [work] if work.pending == 0 else []

    def stages(self) -> list[Stage]:
        return [Stage("pre", self.pre), Stage("infer", self.infer), Stage("post", self.post)]

    def gpu_busy(self, wall_s: float) -> None:
        """No GPU here (the same question ``DeviceStages`` answers)."""
        return None

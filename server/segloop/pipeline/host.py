"""The host stage sets: pre → infer → post on this machine's CPU, for one job.
``device.DeviceStages`` is the same chain on a GPU.

- ``LocalStages`` (an embedded ``Runtime``): ``pre`` cuts one shard's windows in batches
  of one shape into (B, 3, Sh, Sw) float32 (``kernels.pre.normalise_windows``); ``infer``
  runs the model → (B, K, Sh, Sw) float32 scores; ``post`` writes each window's core into
  the shard's (H, W) uint8 labels and confidence (``kernels.post.windows_into``).
- ``RemoteStages`` (a ``TileRuntime``, Triton): ``pre`` gathers the reflect-padded windows
  as (B, Sh, Sw, C) uint8, ``infer`` submits them (pre, model and post run on the
  server), ``post`` copies the returned (B, Sh', Sw') labels and confidence in.

Both share the shard bookkeeping: a shard gets its buffers with its first batch and
leaves ``post`` when its last window is in.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterator

import numpy as np

from segloop.kernels.post import windows_into
from segloop.kernels.pre import Normalisation, normalise_windows
from segloop.pipeline.read import ShardWork, batches
from segloop.pipeline.stages import Stage, StageSet, in_flight_for
from segloop.runtimes import Runtime, TileRuntime
from segloop.tiling import TileGrid


class _HostStages(StageSet):
    """rt: the runtime; grid: the job's grid; batch: windows per call;
    buffers(work): gives a shard its label/confidence buffers (``ShardWriter.buffers``)."""

    def __init__(
        self, rt, grid: TileGrid, batch: int, buffers: Callable[[ShardWork], None]
    ) -> None:
        self.rt, self.grid, self.batch, self.buffers = rt, grid, batch, buffers

    def _index_maps(self, work: ShardWork) -> Iterator[tuple[list[int], np.ndarray, np.ndarray]]:
        """Per batch: window indices, (B, Sh) row and (B, Sw) column maps into the region."""
        for idx in batches(work, self.batch):
            yield (
                idx,
                np.stack([work.maps[i][0] for i in idx]),
                np.stack([work.maps[i][1] for i in idx]),
            )

    def _placed(self, work: ShardWork, idx: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(B, 2) window origins in the shard and (B, 2) core sizes; buffers on first use."""
        if work.labels is None:
            self.buffers(work)
            work.pending = len(work.windows)
        wins = [work.windows[i] for i in idx]
        y0, x0 = work.box[0], work.box[2]
        origins = np.array([(w.y0 - y0, w.x0 - x0) for w in wins], np.intp)
        sizes = np.array([(w.h, w.w) for w in wins], np.intp)
        return origins, sizes

    @staticmethod
    def _done(work: ShardWork, idx: list[int]) -> list[ShardWork]:
        work.pending -= len(idx)
        return [work] if work.pending == 0 else []

    def stages(self) -> list[Stage]:
        return [Stage("pre", self.pre), Stage("infer", self.infer), Stage("post", self.post)]

    @abstractmethod
    def pre(self, work: ShardWork) -> Iterator[tuple]:
        """One shard → (work, window indices, model input) per batch."""

    @abstractmethod
    def infer(self, item: tuple) -> list:
        """(work, indices, input) → [(work, indices, output or its future)]."""

    @abstractmethod
    def post(self, item: tuple) -> list:
        """Outputs into the shard's buffers → [work] once its last window is in."""


class LocalStages(_HostStages):
    """The CPU kernels around an embedded runtime (ONNX Runtime, torch on the CPU);
    norm: the source's normalisation; batch_pixels: see ``stages.in_flight_for``."""

    def __init__(
        self,
        rt: Runtime,
        grid: TileGrid,
        norm: Normalisation,
        batch: int,
        buffers: Callable[[ShardWork], None],
        batch_pixels: int,
    ) -> None:
        super().__init__(rt, grid, batch, buffers)
        self.norm = norm
        # one big-window batch per queue: a 2144² window is 55 MB of input and 55 MB of
        # scores, and a second one in each queue kept ~90 MB more alive without being
        # faster (measured: 8192² with the shipped model, 40k × 10k with the zero-cost one)
        side = grid.window_core + 2 * grid.halo
        self.in_flight = in_flight_for(side, batch, batch_pixels, big=1)

    def pre(self, work: ShardWork) -> Iterator[tuple]:
        for idx, rows, cols in self._index_maps(work):
            arr = np.empty((len(idx), 3, rows.shape[1], cols.shape[1]), np.float32)
            normalise_windows(work.region, rows, cols, self.norm, arr)
            yield work, idx, arr

    def infer(self, item: tuple) -> list:
        work, idx, arr = item
        return [(work, idx, self.rt.run(arr))]

    def post(self, item: tuple) -> list:
        work, idx, scores = item
        origins, sizes = self._placed(work, idx)
        windows_into(scores, self.grid.halo, origins, sizes, work.labels, work.confidence)
        return self._done(work, idx)


class RemoteStages(_HostStages):
    """uint8 windows to a ``TileRuntime`` (Triton) that runs pre, model and post itself;
    as many batches in flight as the runtime keeps requests open."""

    def __init__(
        self, rt: TileRuntime, grid: TileGrid, batch: int, buffers: Callable[[ShardWork], None]
    ) -> None:
        super().__init__(rt, grid, batch, buffers)
        self.in_flight = rt.in_flight

    def pre(self, work: ShardWork) -> Iterator[tuple]:
        for idx, rows, cols in self._index_maps(work):  # only the reflect-padded windows
            yield work, idx, work.region[rows[:, :, None], cols[:, None, :]]

    def infer(self, item: tuple) -> list:
        work, idx, arr = item
        return [(work, idx, self.rt.submit(arr))]

    def post(self, item: tuple) -> list:
        work, idx, future = item
        origins, sizes = self._placed(work, idx)
        labels, conf = future.result()
        for (oy, ox), (h, w), lab, cf in zip(origins, sizes, labels, conf, strict=True):
            work.labels[oy : oy + h, ox : ox + w] = lab[:h, :w]
            work.confidence[oy : oy + h, ox : ox + w] = cf[:h, :w]
        return self._done(work, idx)

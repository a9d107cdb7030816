"""A chain of threads joined by bounded queues, with per-stage busy/wait accounting.

Each stage is one thread running ``fn(item) -> iterable of items`` (so a stage may batch,
split or drop). Work that releases the GIL (decoding, numba ``nogil`` kernels, ONNX
Runtime, zarr codecs) overlaps across stages. The first error stops the whole chain and
is re-raised in the caller.
"""

from __future__ import annotations

import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

_END = object()


def peak_rss_mb() -> float | None:
    """This process's peak resident memory (MB) from /proc (VmHWM; None off Linux).

    Unlike getrusage's ru_maxrss, VmHWM restarts at exec, so a child started from a big
    parent reports its own peak, not the parent's.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


@dataclass
class StageStats:
    """Seconds a stage spent working, waiting for input and waiting to hand on output."""

    name: str
    busy_s: float = 0.0
    wait_in_s: float = 0.0
    wait_out_s: float = 0.0
    items: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "busy_s": round(self.busy_s, 3),
            "wait_in_s": round(self.wait_in_s, 3),
            "wait_out_s": round(self.wait_out_s, 3),
            "items": self.items,
        }


@dataclass
class Stage:
    name: str
    fn: Callable[[Any], Iterable[Any]]
    flush: Callable[[], Iterable[Any]] | None = None  # called once at the end (e.g. last batch)
    stats: StageStats = field(init=False)

    def __post_init__(self) -> None:
        self.stats = StageStats(self.name)


class Pipeline:
    def __init__(self, stages: list[Stage], depth: int = 4) -> None:
        self.stages = stages
        self.depth = depth
        self._error: BaseException | None = None
        self._stop = threading.Event()

    def _put(self, q: queue.Queue, item: Any, stats: StageStats) -> None:
        t = time.perf_counter()
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.1)
                break
            except queue.Full:
                continue
        stats.wait_out_s += time.perf_counter() - t

    def _run_stage(self, stage: Stage, q_in: queue.Queue, q_out: queue.Queue | None) -> None:
        st = stage.stats
        try:
            while not self._stop.is_set():
                t = time.perf_counter()
                try:
                    item = q_in.get(timeout=0.1)
                except queue.Empty:
                    st.wait_in_s += time.perf_counter() - t
                    continue
                st.wait_in_s += time.perf_counter() - t
                t = time.perf_counter()
                if item is _END:
                    results = list(stage.flush()) if stage.flush else []
                else:
                    results = list(stage.fn(item))
                    st.items += 1
                st.busy_s += time.perf_counter() - t
                if q_out is not None:
                    for r in results:
                        self._put(q_out, r, st)
                if item is _END:
                    if q_out is not None:
                        self._put(q_out, _END, st)
                    return
        except BaseException as exc:
            if self._error is None:
                self._error = exc
            self._stop.set()

    def run(self, source: Iterator[Any], source_stats: StageStats) -> None:
        """Feed ``source`` (its time counted in ``source_stats``) through all stages."""
        queues = [queue.Queue(maxsize=self.depth) for _ in self.stages]
        threads = [
            threading.Thread(
                target=self._run_stage,
                name=f"segloop-{s.name}",
                daemon=True,
                args=(s, queues[i], queues[i + 1] if i + 1 < len(queues) else None),
            )
            for i, s in enumerate(self.stages)
        ]
        for th in threads:
            th.start()
        try:
            while not self._stop.is_set():
                t = time.perf_counter()
                try:
                    item = next(source)
                except StopIteration:
                    source_stats.busy_s += time.perf_counter() - t
                    self._put(queues[0], _END, source_stats)
                    break
                source_stats.busy_s += time.perf_counter() - t
                source_stats.items += 1
                self._put(queues[0], item, source_stats)
        except BaseException as exc:
            if self._error is None:
                self._error = exc
            self._stop.set()
        for th in threads:
            while th.is_alive():
                th.join(timeout=0.2)
        if self._error is not None:
            raise self._error


def in_flight_for(window_side: int, batch: int, batch_pixels: int, big: int = 2) -> int:
    """Batches in flight for an embedded model: fewer for big windows (each batch holds
    its input and its scores): 4 up to ``batch_pixels`` of input per batch, else ``big``."""
    return 4 if batch * window_side * window_side <= batch_pixels else big


class StageSet(ABC):
    """The stages between read and write for one job: ``host.LocalStages`` (CPU kernels
    around an embedded runtime), ``host.RemoteStages`` (uint8 windows to a remote
    runtime) and ``device.DeviceStages`` (the whole chain on a GPU)."""

    #: batches in flight between the stages (the pipeline's queue depth)
    in_flight: int = 4

    @abstractmethod
    def stages(self) -> list[Stage]:
        """The stages in data-flow order: each takes one item, returns what it passes on."""

    def gpu_busy(self, wall_s: float) -> float | None:
        """Fraction of ``wall_s`` a GPU was busy; None where no GPU is timed."""
        return None

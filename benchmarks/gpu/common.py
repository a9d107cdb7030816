"""Helpers shared by the GPU benchmark phases (``benchmarks/gpu/run_all.sh``).

Every phase writes one JSON file into ``--out`` as it ends (``write_phase``), so a run cut
short still returns what it measured. ``rehearsal()`` is true for ``run_all.sh
--rehearse`` (CPU torch, numba's CUDA simulator, tiny shapes): its numbers are CPU
numbers, labelled so in every file, and say nothing about a GPU.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def rehearsal() -> bool:
    """True under ``run_all.sh --rehearse`` (``SEGLOOP_GPU_REHEARSE=1``)."""
    return os.environ.get("SEGLOOP_GPU_REHEARSE") == "1"


def device_name() -> str:
    """The GPU's name (torch); "cpu-rehearsal" in a rehearsal, "no-gpu" without one."""
    if rehearsal():
        return "cpu-rehearsal"
    try:
        import torch
    except ImportError:
        return "no-gpu"
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no-gpu"


def slug(name: str) -> str:
    """File-name form of a device name: "NVIDIA H200" → "nvidia_h200"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def write_phase(out: Path, name: str, result: dict[str, Any]) -> Path:
    """``out/<name>.json`` (written whole, then renamed), stamped with device, host, date
    and whether this is a CPU rehearsal."""
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "phase": name,
        "device": device_name(),
        "rehearsal": rehearsal(),
        "host": platform.node(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        **result,
    }
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    print(f"[{name}] {json.dumps(result)[:400]}", flush=True)
    return path


def torch_timer(device) -> Callable[[Callable[[], object], int, int], float]:
    """``timed(fn, repeat, warmup)`` → seconds per call: CUDA events on a GPU (after
    ``warmup`` calls and a synchronize), perf_counter on the CPU."""
    import torch

    def timed(fn: Callable[[], object], repeat: int, warmup: int = 2) -> float:
        for _ in range(warmup):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeat):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000 / repeat
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        return (time.perf_counter() - t0) / repeat

    return timed

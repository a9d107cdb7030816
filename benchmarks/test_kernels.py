"""Micro benchmarks of the CPU kernels beside plain-numpy versions of the same step.

Run with ``make bench`` (``pytest benchmarks --benchmark-enable``); pytest-benchmark
prints the side-by-side table. One batch = 4 windows of 608² (tile 512 + halo 48).
"""

from __future__ import annotations

import numpy as np
import pytest

from segloop.kernels.post import labels_confidence
from segloop.kernels.pre import Normalisation, normalise_into, reflect_index

WINDOW, HALO, BATCH = 608, 48, 4
NORM = Normalisation(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.fixture(scope="module")
def region() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (WINDOW, WINDOW, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def logits() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((BATCH, 3, WINDOW, WINDOW), np.float32)


def _pre_numba(region: np.ndarray) -> np.ndarray:
    out = np.empty((BATCH, 3, WINDOW, WINDOW), np.float32)
    idx = reflect_index(0, WINDOW, WINDOW)
    for i in range(BATCH):
        normalise_into(region, idx, idx, NORM, out[i])
    return out


def _pre_numpy(region: np.ndarray) -> np.ndarray:
    one = (region.astype(np.float32) / 255 - 0.5) / 0.25
    return np.ascontiguousarray(np.broadcast_to(one.transpose(2, 0, 1), (BATCH, 3, WINDOW, WINDOW)))


def _post_numpy(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    core = logits[:, :, HALO:-HALO, HALO:-HALO]
    p = np.exp(core - core.max(1, keepdims=True))
    pmax = 1 / p.sum(1)
    k = logits.shape[1]
    conf = np.clip(np.rint(255 * (pmax - 1 / k) / (1 - 1 / k)), 0, 255).astype(np.uint8)
    return core.argmax(1).astype(np.uint8), conf


@pytest.mark.benchmark(group="pre: uint8 HWC -> float32 NCHW, 4×608²")
@pytest.mark.parametrize("impl", [_pre_numba, _pre_numpy], ids=["numba", "numpy"])
def test_pre(benchmark, region, impl):
    out = benchmark(impl, region)
    assert out.shape == (BATCH, 3, WINDOW, WINDOW)


@pytest.mark.benchmark(group="post: logits -> labels + confidence, 4×512²")
@pytest.mark.parametrize(
    "impl",
    [lambda x: labels_confidence(x, HALO, WINDOW - 2 * HALO), _post_numpy],
    ids=["numba", "numpy"],
)
def test_post(benchmark, logits, impl):
    labels, conf = benchmark(impl, logits)
    assert labels.shape == conf.shape == (BATCH, WINDOW - 2 * HALO, WINDOW - 2 * HALO)

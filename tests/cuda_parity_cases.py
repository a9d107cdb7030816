"""Parity cases of the CUDA kernels against their CPU twins, run in a fresh interpreter by
``tests/test_kernels_cuda.py`` (``NUMBA_ENABLE_CUDASIM=1`` must be set before numba.cuda
is first imported, hence the child process). Prints one JSON object: case → "ok" or the
failure. Small shapes: each simulated CUDA thread is a Python thread.

The CPU references are ``pre.normalise_into`` / ``post.labels_confidence`` applied window
by window, and ``pipeline.uncertainty.tile_uncertainty``; where the CPU batch twins
``pre.normalise_windows`` / ``post.windows_into`` exist they are checked equal to those
references too.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable

import numpy as np
from numba import cuda

from segloop.kernels import post, post_cuda, pre, pre_cuda
from segloop.pipeline.uncertainty import tile_uncertainty

CASES: dict[str, Callable[[], None]] = {}


def case(fn: Callable[[], None]) -> Callable[[], None]:
    CASES[fn.__name__] = fn
    return fn


def _maps(rng, n: int, length: int, size: int, dtype) -> np.ndarray:
    """(n, length) reflect index maps of windows starting anywhere from −length/2 (edge
    windows fold back at 0 and at ``size``) to past the end."""
    starts = rng.integers(-length // 2, size, n)
    return np.stack([pre.reflect_index(int(s), length, size) for s in starts]).astype(dtype)


def _pre_case(src_dtype, channels: int, out_dtype, shape=(23, 17), window=(24, 16), n=3, calls=1):
    rng = np.random.default_rng(channels + np.dtype(src_dtype).itemsize)
    top = np.iinfo(src_dtype).max
    src = rng.integers(0, top, (*shape, channels), dtype=src_dtype, endpoint=True)
    picks = (0, 0, 0) if channels == 1 else (2, 1, 0) if channels == 4 else (0, 1, 2)
    norm = pre.Normalisation((0.5, 0.4, 0.3), (0.25, 0.2, 0.3), picks, float(top))
    rows = _maps(rng, n, window[0], shape[0], np.int32)
    cols = _maps(rng, n, window[1], shape[1], np.int64)
    want = np.empty((n, 3, *window), np.float32)
    for b in range(n):
        pre.normalise_into(src, rows[b], cols[b], norm, want[b])
    if hasattr(pre, "normalise_windows"):  # the CPU batch twin, where it exists: same values
        batch = np.empty_like(want)
        pre.normalise_windows(src, rows.astype(np.intp), cols.astype(np.intp), norm, batch)
        np.testing.assert_array_equal(batch, want)
    tol = 1e-5 if out_dtype == np.float32 else 2e-3
    # 1. the buffer class, host maps through its pinned slots (calls > 1: slot reuse)
    wn = pre_cuda.WindowNormaliser(norm, n + 2, window, out_dtype)
    region = cuda.to_device(src)
    for _ in range(calls):
        got = wn(region, rows, cols).copy_to_host()
        assert got.dtype == out_dtype and got.shape == (n, 3, *window), (got.dtype, got.shape)
        np.testing.assert_allclose(got.astype(np.float32), want, atol=tol, rtol=tol)
    # 2. the function, device maps, an output buffer larger than the batch
    out = cuda.to_device(np.full((n + 1, 3, *window), 7, out_dtype))
    pre_cuda.normalise_windows(region, cuda.to_device(rows), cuda.to_device(cols), norm, out)
    host = out.copy_to_host()
    np.testing.assert_allclose(host[:n].astype(np.float32), want, atol=tol, rtol=tol)
    assert (host[n] == 7).all(), "a slot past the batch was written"


@case
def pre_uint8_rgb_fp32_nonsquare_edges():
    _pre_case(np.uint8, 3, np.float32, calls=2)


@case
def pre_uint16_rgb_fp32():
    _pre_case(np.uint16, 3, np.float32, window=(16, 24), n=2)


@case
def pre_uint8_gray_fp16():
    _pre_case(np.uint8, 1, np.float16, n=2)


@case
def pre_uint16_rgba_fp16():
    _pre_case(np.uint16, 4, np.float16, shape=(9, 30), window=(16, 40), n=2)


@case
def pre_refuses_mismatched_shapes():
    norm = pre.Normalisation((0.5,) * 3, (0.25,) * 3)
    region = cuda.to_device(np.zeros((8, 8, 3), np.uint8))
    rows = cuda.to_device(np.zeros((2, 8), np.int32))
    cols = cuda.to_device(np.zeros((2, 8), np.int32))
    out = cuda.device_array((2, 3, 8, 16), np.float32)
    try:
        pre_cuda.normalise_windows(region, rows, cols, norm, out)
    except ValueError as exc:
        assert "want rows (B, Sh)" in str(exc)
    else:
        raise AssertionError("a (2, 3, 8, 16) out for 8-column maps was accepted")


def _post_case(k: int, logit_dtype, window=(20, 28), halo=4, clip=(7, 9), ties=False):
    """Three windows into one shard buffer: a full core, a core clipped at the shard's
    bottom, a core clipped at its right (by ``clip`` px kept); cells outside the cores
    keep their sentinel."""
    rng = np.random.default_rng(k)
    n = 3
    core = (window[0] - 2 * halo, window[1] - 2 * halo)
    shard = (core[0] + clip[0], core[1] + clip[1])
    logits = (rng.standard_normal((n, k, *window)) * 3).astype(logit_dtype)
    if ties:  # exact ties everywhere in window 0: the lower class wins
        logits[0, 1:] = logits[0, :1]
        logits[1, :, 5:9, 5:9] = 0  # uniform: confidence 0
    origins = np.array([[0, 0], [core[0], 0], [0, core[1]]], np.int32)
    sizes = np.array([core, (shard[0] - core[0], core[1]), (core[0], shard[1] - core[1])], np.int32)
    assert (sizes <= core).all()
    want_l = np.full(shard, 99, np.uint8)
    want_c = np.full(shard, 99, np.uint8)
    # the CPU twin takes square windows: pad to one, keep each core's (h, w) corner
    side = max(window)
    square = np.zeros((n, k, side, side), np.float32)
    square[:, :, : window[0], : window[1]] = logits
    ref_l, ref_c = post.labels_confidence(square, halo, side - 2 * halo)
    for b in range(n):
        (y, x), (h, w) = origins[b], sizes[b]
        want_l[y : y + h, x : x + w] = ref_l[b, :h, :w]
        want_c[y : y + h, x : x + w] = ref_c[b, :h, :w]
    if hasattr(post, "windows_into"):  # the CPU batch twin, where it exists: same values
        cpu_l, cpu_c = np.full(shard, 99, np.uint8), np.full(shard, 99, np.uint8)
        f32 = logits.astype(np.float32)
        post.windows_into(f32, halo, origins.astype(np.intp), sizes.astype(np.intp), cpu_l, cpu_c)
        np.testing.assert_array_equal(cpu_l, want_l)
        np.testing.assert_array_equal(cpu_c, want_c)
    sp = post_cuda.ShardPost(shard, 8, n)
    sp.labels.copy_to_device(np.full(shard, 99, np.uint8))
    sp.confidence.copy_to_device(np.full(shard, 99, np.uint8))
    d_logits = cuda.to_device(logits)
    sp.windows(d_logits[:2], halo, origins[:2], sizes[:2])  # two calls: pinned slot reuse
    sp.windows(d_logits[2:], halo, origins[2:], sizes[2:])
    got_l, got_c = sp.labels.copy_to_host(), sp.confidence.copy_to_host()
    np.testing.assert_array_equal(got_l, want_l)
    diff = np.abs(got_c.astype(int) - want_c)
    assert diff.max() <= 1 and np.mean(diff > 0) < 0.01, (diff.max(), np.mean(diff > 0))
    if ties:
        assert (got_l[: core[0], : core[1]] == 0).all()
        assert (got_c[core[0] + 1 : core[0] + 5, 1:5] == 0).all()
    # the function with device origins/sizes gives the same
    labels = cuda.to_device(np.full(shard, 99, np.uint8))
    conf = cuda.to_device(np.full(shard, 99, np.uint8))
    post_cuda.windows_into(
        d_logits, halo, cuda.to_device(origins), cuda.to_device(sizes), labels, conf
    )
    np.testing.assert_array_equal(labels.copy_to_host(), want_l)
    np.testing.assert_array_equal(conf.copy_to_host(), got_c)


@case
def post_fp32_k3_nonsquare_edges():
    _post_case(3, np.float32)


@case
def post_fp16_k3_ties():
    _post_case(3, np.float16, ties=True)


@case
def post_fp32_k5():
    _post_case(5, np.float32, window=(24, 16), clip=(3, 8))


@case
def post_fp16_k2():
    _post_case(2, np.float16)


@case
def uncertainty_matches_cpu_with_clipped_edge_tiles():
    rng = np.random.default_rng(5)
    shard = np.full((40, 48), 200, np.uint8)
    shard[:27, :37] = rng.integers(0, 256, (27, 37), dtype=np.uint8)
    sp = post_cuda.ShardPost(shard.shape, 16, 1)
    sp.confidence.copy_to_device(shard)
    got = sp.finish((27, 37)).copy_to_host()  # 2 × 3 tiles, the last row/column clipped
    want = tile_uncertainty(shard[:27, :37], 16)
    assert got.shape == want.shape == (2, 3), (got.shape, want.shape)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    full = cuda.device_array((3, 3), np.float32)
    post_cuda.tile_uncertainty(sp.confidence, 16, full)
    np.testing.assert_allclose(full.copy_to_host(), tile_uncertainty(shard, 16), atol=1e-6)


def main() -> None:
    results = {}
    for name, fn in CASES.items():
        t0 = time.perf_counter()
        try:
            fn()
            results[name] = f"ok {time.perf_counter() - t0:.1f} s"
        except Exception:
            results[name] = traceback.format_exc(limit=4)[-2000:]
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()

"""CPU kernels against plain-numpy references; runtimes against each other."""

from __future__ import annotations

import numpy as np
import pytest

from segloop.kernels.post import labels_confidence
from segloop.kernels.pre import Normalisation, normalise_into, reflect_index
from segloop.pipeline.segment import default_model
from segloop.runtimes import create_runtime


@pytest.mark.parametrize(
    ("start", "length", "size"),
    [(-48, 160, 64), (-5, 20, 3), (0, 7, 1), (40, 100, 50), (-200, 9, 7)],
)
def test_reflect_index_matches_numpy_pad(start, length, size):
    axis = np.arange(size)
    pad = 400
    padded = np.pad(axis, pad, mode="reflect") if size > 1 else np.zeros(size + 2 * pad, int)
    expect = padded[start + pad : start + pad + length]
    np.testing.assert_array_equal(reflect_index(start, length, size), expect)


@pytest.mark.parametrize(
    ("dtype", "channels"), [(np.uint8, 3), (np.uint16, 3), (np.uint8, 1), (np.uint8, 4)]
)
def test_normalise_matches_numpy(dtype, channels):
    rng = np.random.default_rng(1)
    top = np.iinfo(dtype).max
    src = rng.integers(0, top, (37, 45, channels), dtype=dtype, endpoint=True)
    norm = Normalisation(
        mean=(0.5, 0.4, 0.3),
        std=(0.25, 0.2, 0.3),
        channels=(0, 0, 0) if channels == 1 else (0, 1, 2),
        max_value=float(top),
    )
    rows, cols = reflect_index(-10, 64, 37), reflect_index(-10, 64, 45)
    out = np.empty((3, 64, 64), np.float32)
    normalise_into(src, rows, cols, norm, out)
    region = src[rows][:, cols][..., list(norm.channels)].astype(np.float64)
    expect = (region / top - np.array(norm.mean)) / np.array(norm.std)
    np.testing.assert_allclose(out, np.moveaxis(expect, -1, 0), atol=2e-5)


def test_labels_confidence_matches_numpy():
    rng = np.random.default_rng(2)
    logits = (rng.standard_normal((3, 4, 40, 40)) * 3).astype(np.float32)
    logits[0, :, 10, 10] = 0.0  # a uniform pixel: confidence 0, tie → class 0
    logits[1, 2, 12, 12] = 80.0  # a certain pixel: confidence 255
    halo, core = 8, 24
    labels, conf = labels_confidence(logits, halo, core)
    crop = logits[:, :, halo : halo + core, halo : halo + core].astype(np.float64)
    p = np.exp(crop - crop.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_array_equal(labels, p.argmax(1))
    k = logits.shape[1]
    expect = np.clip(np.round(255 * (p.max(1) - 1 / k) / (1 - 1 / k)), 0, 255)
    assert np.abs(conf.astype(int) - expect).max() <= 1
    assert labels.dtype == conf.dtype == np.uint8
    assert conf[0, 2, 2] == 0 and labels[0, 2, 2] == 0
    assert conf[1, 4, 4] == 255 and labels[1, 4, 4] == 2


def test_onnx_and_torch_runtimes_agree():
    rng = np.random.default_rng(3)
    batch = rng.standard_normal((2, 3, 128, 128)).astype(np.float32)
    model = default_model()
    onnx_rt, torch_rt = create_runtime("onnx", model, 2), create_runtime("torch", model, 2)
    a, b = onnx_rt.run(batch), torch_rt.run(batch)
    assert a.shape == b.shape == (2, len(onnx_rt.card["classes"]), 128, 128)
    assert np.abs(a - b).max() < 1e-3 * max(1.0, np.abs(a).max())
    assert np.mean(a.argmax(1) == b.argmax(1)) >= 0.9999


def test_tensorrt_runtime_agrees_with_onnx():
    pytest.importorskip(
        "tensorrt",
        reason="TensorRT cannot be installed on these machines; "
        "the tensorrt runtime runs only where it is (a GPU node)",
    )
    rng = np.random.default_rng(4)
    batch = rng.standard_normal((2, 3, 128, 128)).astype(np.float32)
    a = create_runtime("onnx", default_model(), 2).run(batch)
    b = create_runtime("tensorrt", default_model(), 2).run(batch)
    assert np.mean(a.argmax(1) == b.argmax(1)) >= 0.999  # fp16 engine: near, not equal

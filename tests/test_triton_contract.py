"""The Triton wire contract as code (no server needed) and the GPU configs' consistency."""

from __future__ import annotations

import re

import pytest

from segloop.triton.contract import check_windows
from tests.conftest import ROOT


@pytest.mark.parametrize("shape", [(1, 608, 536, 3), (16, 104, 104, 1), (2, 200, 1120, 4)])
def test_valid_windows_pass(shape):
    assert check_windows(shape, 48, 8) is None


@pytest.mark.parametrize(
    ("shape", "words"),
    [
        ((608, 608, 3), "(batch, height, width, channels)"),
        ((1, 608, 608, 2), "1, 3 or 4 channels"),
        ((1, 612, 608, 3), "height 612 must be a multiple of 8"),
        ((1, 608, 0, 3), "width 0 must be larger than 2 × halo = 96"),
        ((1, 96, 608, 3), "height 96 must be larger than 2 × halo = 96"),
    ],
)
def test_each_broken_rule_is_named(shape, words):
    rule = check_windows(shape, 48, 8)
    assert rule is not None and words in rule, rule


def _io(path):
    """name → data type of a config's inputs and outputs."""
    text = (ROOT / "model_repository" / path).read_text()
    return dict(re.findall(r'name: "(\w+)" data_type: (TYPE_\w+)', text))


def test_gpu_configs_chain_float16_device_tensors():
    pre, unet, post = (
        _io(f"{m}/configs/gpu.pbtxt") for m in ("segloop_pre", "segloop_unet", "segloop_post")
    )
    assert pre["TILES"] == "TYPE_UINT8" and pre["image"] == unet["image"] == "TYPE_FP16"
    assert unet["logits"] == post["logits"] == "TYPE_FP16"
    assert post["LABELS"] == post["CONFIDENCE"] == "TYPE_UINT8"
    for m in ("segloop_pre", "segloop_unet", "segloop_post"):
        text = (ROOT / "model_repository" / m / "configs/gpu.pbtxt").read_text()
        assert "KIND_GPU" in text and '"FORCE_CPU_ONLY_INPUT_TENSORS"' in text

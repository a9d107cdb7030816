"""``TorchRuntime.run_device``: the device-resident entry point (tensor in, tensor out on
the runtime's device), eager and, on a GPU, replayed as CUDA graphs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segloop.pipeline.segment import default_model
from segloop.runtimes.torch import MAX_GRAPHS, TorchRuntime


def _batch(b: int, sh: int, sw: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((b, 3, sh, sw)).astype(np.float32)


def test_run_device_on_the_cpu_equals_run():
    rt = TorchRuntime(default_model(), 2, graphs=True)  # graphs: ignored on the CPU
    assert rt.graphs is False
    x = _batch(2, 112, 104)
    got = rt.run_device(torch.from_numpy(x))
    assert got.dtype == torch.float32 and tuple(got.shape) == (2, 3, 112, 104)
    np.testing.assert_array_equal(got.numpy(), rt.run(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU; none here")
def test_graphed_run_device_equals_eager_on_the_gpu():
    eager = TorchRuntime(default_model(), 2, device="cuda")
    graphed = TorchRuntime(default_model(), 2, device="cuda", graphs=True)
    for seed in range(3):  # the first call captures, the next ones replay with new inputs
        x = torch.from_numpy(_batch(4, 160, 224, seed)).cuda()
        want = eager.run_device(x)
        got = graphed.run_device(x)
        assert got.dtype == torch.float16 and got.shape == want.shape
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    assert len(graphed._graphs) == 1
    for b in range(1, MAX_GRAPHS + 2):  # beyond MAX_GRAPHS shapes: eager, still right
        x = torch.from_numpy(_batch(b, 96, 96)).cuda()
        torch.testing.assert_close(graphed.run_device(x), eager.run_device(x), atol=2e-2, rtol=2e-2)
    assert len(graphed._graphs) == MAX_GRAPHS

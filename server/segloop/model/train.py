"""Train the UNet on synthetic histology and export it as a versioned ONNX model."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from segloop.model.card import HELD_OUT_SEED, write_card
from segloop.model.unet import MEAN, STD, UNet
from segloop.scores import iou
from segloop.synth import render


def normalise(
    rgb: np.ndarray, mean: Sequence[float] = MEAN, std: Sequence[float] = STD
) -> torch.Tensor:
    """(N, H, W, 3) uint8 → (N, 3, H, W) float32 model input, ``(rgb/255 - mean) / std``
    (R, G, B; default the UNet's)."""
    x = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255.0
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


def sample_batch(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Random training patches from random slides: (n, size, size, 3) uint8, (n, size, size)."""
    imgs, truths = [], []
    for _ in range(n):
        y, x = (int(v) for v in rng.integers(0, 60_000, 2))
        rgb, truth = render(y, x, size, size, seed=int(rng.integers(1, 10_000)))
        # mild photometric jitter (scanner variation), not a stain change
        gain = rng.uniform(0.92, 1.08, 3)
        rgb = np.clip(rgb * gain + rng.normal(0, 2, rgb.shape), 0, 255).astype(np.uint8)
        imgs.append(rgb)
        truths.append(truth)
    return np.stack(imgs), np.stack(truths)


def evaluate(model: nn.Module, size: int = 1024, seed: int = HELD_OUT_SEED) -> dict[str, float]:
    rgb, truth = render(0, 0, size, size, seed=seed)
    with torch.no_grad():
        pred = model(normalise(rgb[None])).argmax(1)[0].numpy()
    return iou(pred, truth)


def train(
    steps: int = 600,
    batch: int = 8,
    patch: int = 192,
    lr: float = 2e-3,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> tuple[UNet, dict]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = UNet()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 1.0, 2.0]))
    t0 = time.time()
    for step in range(steps):
        rgb, truth = sample_batch(rng, batch, patch)
        loss = loss_fn(model(normalise(rgb)), torch.from_numpy(truth).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step:4d}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    model.eval()
    metrics = evaluate(model)
    info = {
        "steps": steps,
        "batch": batch,
        "patch": patch,
        "lr": lr,
        "seed": seed,
        "train_seconds": round(time.time() - t0, 1),
        "held_out_iou": metrics,
    }
    return model, info


def export_onnx(model: UNet, path: Path, card: dict) -> None:
    """Export with dynamic batch/height/width; the card goes into ONNX metadata_props."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    dummy = torch.zeros(1, 3, 128, 128)
    axes = {0: "batch", 2: "height", 3: "width"}
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": axes, "logits": axes},
    )
    proto = onnx.load(str(path))
    write_card(proto, card)
    onnx.save(proto, str(path))

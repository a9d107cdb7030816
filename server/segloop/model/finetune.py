"""``segloop finetune``: a new model version from human corrections.

Starts from the served ONNX weights, trains on random crops of the corrected tiles and
exports the next version into the Triton model repository with a model card that
records its lineage. Two kinds of model:

- segloop's UNet (``segloop train``): its torch code (``model.unet``); batches mix in a
  replay of synthetic in-distribution patches (what it was trained on: no forgetting),
  validated on both; the new version is exported from torch.
- any model ``segloop model add`` wrote: its stored graph run by torch operators
  (``model.onnx_torch``, checked against ONNX Runtime first), normalised as its card
  says, any class count. segloop has no data of its classes to replay, so it trains on
  the corrections alone and validates on them (held-out tiles where given). The new
  version is the same graph with the trained weights written back (normalisation
  statistics frozen), its halo measured again as ``model add`` does.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from segloop.errors import UserError
from segloop.model.card import (
    card_of,
    is_unet,
    model_card,
    read_card,
    write_card,
    write_card_markdown,
)
from segloop.model.corrections import IGNORE, CorrectionsDataset
from segloop.model.onnx_torch import OnnxModule, check_parity, write_back
from segloop.model.train import evaluate, export_onnx, normalise, sample_batch
from segloop.model.weights import load_unet
from segloop.scores import iou


def trainable(model_path: Path, card: dict) -> nn.Module:
    """The network of ``model_path`` as a torch module: (N, 3, H, W) float32 input,
    normalised as its card says → (N, K, H, W) float32 logits."""
    if is_unet(card):
        return load_unet(model_path, len(card["classes"]))
    from segloop.model.add import NET_PREFIX

    module = OnnxModule(onnx.load(str(model_path)), prefix=NET_PREFIX)
    check_parity(module.proto, module, side=4 * max(16, card["input"]["multiple_of"]))
    return module


def model_input(rgb: np.ndarray, card: dict) -> torch.Tensor:
    """(N, H, W, 3) uint8 → (N, 3, H, W) float32, ``(rgb/255 - mean) / std`` of the card."""
    return normalise(rgb, card["input"]["mean"], card["input"]["std"])


def _crops(
    data: CorrectionsDataset, rng: np.random.Generator, n: int, size: int, multiple: int
) -> tuple[np.ndarray, torch.Tensor]:
    """n random (size², flipped/rotated) crops of corrected tiles, drawn by their weights;
    sides are multiples of ``multiple`` (the model's downsampling factor)."""
    imgs, targets = [], []
    weights = data.weights
    for _ in range(n):
        rgb, target = data[int(rng.choice(len(data), p=weights))]
        h, w = target.shape
        s = max(multiple, min(size, h, w) // multiple * multiple)
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        rgb, target = rgb[y : y + s, x : x + s], target[y : y + s, x : x + s].numpy()
        k = int(rng.integers(4))
        rgb, target = np.rot90(rgb, k), np.rot90(target, k)
        if rng.random() < 0.5:
            rgb, target = rgb[:, ::-1], target[:, ::-1]
        ph, pw = size - rgb.shape[0], size - rgb.shape[1]  # a small tile: padded, ignored
        imgs.append(np.pad(rgb, ((0, ph), (0, pw), (0, 0)), mode="reflect"))
        targets.append(np.pad(target, ((0, ph), (0, pw)), constant_values=IGNORE))
    return np.stack(imgs), torch.from_numpy(np.stack(targets).astype(np.int64))


def corrections_iou(model: nn.Module, data: CorrectionsDataset, card: dict) -> dict[str, float]:
    """IoU of the model on the corrected tiles' labelled pixels (what it was tuned on),
    per class of the card."""
    preds, truths = [], []
    m = card["input"]["multiple_of"]
    with torch.no_grad():
        for i in range(len(data)):
            rgb, target = data[i]
            h, w = target.shape
            padded = np.pad(rgb, ((0, -h % m), (0, -w % m), (0, 0)), mode="reflect")
            pred = model(model_input(padded[None], card)).argmax(1)[0, :h, :w].numpy()
            keep = target.numpy() != IGNORE
            preds.append(pred[keep])
            truths.append(target.numpy()[keep])
    return iou(np.concatenate(preds), np.concatenate(truths), card["classes"])


def validate(
    model: nn.Module, data: CorrectionsDataset, card: dict, size: int = 1024
) -> dict[str, dict[str, float]]:
    """IoU on the corrections ``data`` and, for segloop's UNet, on the held-out
    in-distribution synthetic image (``size``² px; other models: ``{}``)."""
    return {
        "corrections": corrections_iou(model, data, card),
        "in_distribution": evaluate(model, size) if is_unet(card) else {},
    }


def finetune(
    model_path: Path,
    corrections: Path,
    epochs: int = 30,
    batch: int = 8,
    patch: int = 192,
    replay: float = 0.75,
    lr: float = 5e-4,
    seed: int = 0,
    log: Callable[[str], None] = print,
    steps: int | None = None,
    held_out: list[int] | None = None,
    validation_px: int = 1024,
) -> tuple[nn.Module, dict]:
    """Fine-tune ``model_path`` on ``corrections``; (model, training info for the card).

    One epoch = as many correction crops as the corrected tiles hold patch-sized
    pieces; each batch is ``1 − replay`` correction crops + ``replay`` synthetic ones.
    ``steps``: this many optimiser steps instead of ``epochs``. ``held_out``: indices
    of corrected tiles kept out of training and validated on (default: validate on the
    training tiles); ``validation_px``: side of the synthetic in-distribution image.
    Scores ``before`` (the model it starts from) and ``after`` are on the same data.
    """
    card = read_card(model_path)
    everything = CorrectionsDataset(corrections)
    held = sorted(set(held_out or ()))
    data = everything.subset([i for i in range(len(everything)) if i not in held])
    check = everything.subset(held) if held else data
    if len(data) == 0:
        raise UserError(f"{corrections} holds no corrected tiles; review some tiles first")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = trainable(model_path, card).train()
    if not is_unet(card) and replay:
        log(f"{card['name']}: no synthetic replay (segloop has no data of its classes)")
        replay = 0.0
    multiple = max(8, card["input"]["multiple_of"])
    patch = max(multiple, patch // multiple * multiple)
    n_real = max(1, round(batch * (1 - replay)))
    pieces = sum(
        max(1, (b[1] - b[0]) * (b[3] - b[2]) // patch**2) for b in (it["box"] for it in data.items)
    )
    steps = steps or epochs * max(1, -(-pieces // n_real))
    before = validate(model.eval(), check, card, validation_px)
    log(f"fine-tuning on {len(data)} tiles: {steps} steps; before {before}")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    weight = torch.tensor([1.0, 1.0, 2.0]) if is_unet(card) else None  # UNet: nuclei count 2×
    loss_fn = nn.CrossEntropyLoss(weight=weight, ignore_index=IGNORE)
    t0, losses = time.time(), []
    for step in range(steps):
        rgb, target = _crops(data, rng, n_real, patch, multiple)
        if batch > n_real:
            syn, truth = sample_batch(rng, batch - n_real, patch)
            rgb = np.concatenate([rgb, syn])
            target = torch.cat([target, torch.from_numpy(truth).long()])
        loss = loss_fn(model(model_input(np.ascontiguousarray(rgb), card)), target)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps - 1:
            log(f"step {step:4d}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    model.eval()
    after = validate(model, check, card, validation_px)
    index = data.index
    info = {
        "finetuned_from": {"version": card.get("version"), "sha256": card["sha256"]},
        "corrections": {
            "tiles": len(data),
            "held_out": [everything.items[i]["tile"] for i in held],
            "store": index["store"],
            "exported": index["exported"],
            "reviewers": sorted({it["reviewer"] for it in data.items}),
            "changed_px": sum(it["changed_px"] for it in data.items),
        },
        "steps": steps,
        "epochs": epochs,
        "batch": batch,
        "patch": patch,
        "replay": replay,
        "lr": lr,
        "seed": seed,
        "train_seconds": round(time.time() - t0, 1),
        # mean training loss of the first and the last (up to) 5 steps
        "loss": {
            "first": round(float(np.mean(losses[:5])), 4),
            "last": round(float(np.mean(losses[-5:])), 4),
        },
        "before": before,
        "after": after,
        "held_out_iou": after["in_distribution"] if is_unet(card) else after["corrections"],
    }
    return model, info


#: sub-folders of a model folder that keep versions Triton must not load (non-numeric
#: names, which Triton and ``registry.versions`` skip): scored worse than their parent,
#: or rolled back (``segloop.learn``)
ASIDE = ("rejected", "retired")


def next_version(models: Path) -> int:
    """The next unused version number under ``models`` (set-aside versions count too)."""
    found = [
        int(p.name)
        for folder in (models, *(models / a for a in ASIDE))
        for p in folder.glob("[0-9]*")
        if p.name.isdigit()
    ]
    if not any(p.name.isdigit() for p in models.glob("[0-9]*")):
        raise UserError(f"{models} has no version folder; is it a segloop model repository?")
    return max(found) + 1


def write_added(model: OnnxModule, info: dict, version: int, folder: Path) -> None:
    """``folder``/model.onnx and MODEL_CARD.md of a fine-tuned added model: its graph with
    the trained weights, the parent's card with the new version, lineage and halo (the
    receptive field measured again, as ``model add`` does)."""
    from segloop.model.add import card_markdown, measure, session

    proto = write_back(model)
    card = card_of(proto)
    measured = measure(session(proto, torch.get_num_threads()), len(card["classes"]), folder)
    card.update(
        version=version,
        parent_version=info["finetuned_from"]["version"],
        training=info,
        **measured.card_fields(),
    )
    card["input"]["multiple_of"] = measured.multiple
    write_card(proto, card)
    onnx.save(proto, str(folder / "model.onnx"))
    (folder / "MODEL_CARD.md").write_text(card_markdown(card))


def publish(
    model: nn.Module,
    info: dict,
    repository: Path,
    name: str = "segloop_unet",
    version: int | None = None,
    aside: str | None = None,
) -> Path:
    """Write ``model`` as version ``version`` (default: the next) of ``repository/name``,
    or set aside in ``name/<aside>/`` (one of ``ASIDE``); returns its model.onnx. The
    folder appears whole (written aside, then renamed), so a Triton polling the
    repository never sees half a version."""
    models = repository / name
    version = version or next_version(models)
    newest = max(int(p.name) for p in models.glob("[0-9]*") if p.name.isdigit())
    tmp = models / f".v{version}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    shutil.copy(models / str(newest) / "model.py", tmp / "model.py")  # the same shim
    parent = info["finetuned_from"]["version"]
    if isinstance(model, OnnxModule):
        write_added(model, info, version, tmp)
    else:
        card = model_card(model, info, version=version, parent=parent)
        export_onnx(model, tmp / "model.onnx", card)
        write_card_markdown(card, tmp / "MODEL_CARD.md")
    final = models / str(version) if aside is None else models / aside / str(version)
    final.parent.mkdir(exist_ok=True)
    os.replace(tmp, final)
    return final / "model.onnx"

"""Model card: what a model file is, carried in its ONNX ``metadata_props`` and beside it
as MODEL_CARD.md. Runtimes read tiling parameters (halo, normalisation) from it.

Fields (one JSON value per ``metadata_props`` key): ``name``, ``version``, ``classes``
(K names), ``colors`` (K RGBA), ``input`` (layout NCHW, ``mean`` / ``std`` in R, G, B
order applied to ``pixel / max_value``, ``multiple_of`` = the downsampling factor),
``output``, ``receptive_radius``, ``halo``. Cards written by ``segloop model add`` also
state ``input.channels`` (RGB, BGR or gray: what the network takes), ``output.kind``
(logits or probabilities: what it emits; the stored graph always emits logits) and
``mpp`` (µm/px it was trained at, or null); segloop's own UNet is RGB → logits.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from segloop.errors import UserError
from segloop.synth import CLASS_NAMES, SYNTH_MPP

if TYPE_CHECKING:  # torch is imported only to train/export, not to read a card
    from torch import nn

HELD_OUT_SEED = 90210


def read_card(path: Path) -> dict:
    """The card stored in an ONNX file, plus its ``sha256`` and ``path``."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise UserError(f"{path}: not a readable ONNX model ({exc})") from exc
    card = card_of(proto)
    if "halo" not in card or "input" not in card:
        raise UserError(
            f"{path}: ONNX model has no segloop model card (halo, input); add it with "
            "`segloop model add MODEL.onnx --name NAME --classes a,b,…`"
        )
    card["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    card["path"] = str(path)
    return card


def card_of(proto: onnx.ModelProto) -> dict:
    """The card fields in ``proto.metadata_props`` (each a JSON value), as stored."""
    return {p.key: json.loads(p.value) for p in proto.metadata_props}


def is_unet(card: dict) -> bool:
    """Whether the card is segloop's own UNet (else a model ``model add`` wrote)."""
    return card.get("architecture", {}).get("type") == "unet"


def write_card(proto: onnx.ModelProto, card: dict) -> None:
    """Put ``card`` into ``proto.metadata_props`` (one JSON value per key; replaces any)."""
    del proto.metadata_props[:]
    for key, value in card.items():
        entry = proto.metadata_props.add()
        entry.key = key
        entry.value = json.dumps(value)


def model_card(model: nn.Module, info: dict, version: int, parent: int | None = None) -> dict:
    from segloop.model.unet import DOWNSAMPLE, MEAN, STD, WIDTHS, receptive_radius

    radius = receptive_radius(model)
    halo = -(-radius // DOWNSAMPLE) * DOWNSAMPLE
    return {
        "name": "segloop_unet",
        "version": version,
        "parent_version": parent,
        "classes": list(CLASS_NAMES),
        "colors": [[0, 0, 0, 0], [236, 124, 186, 255], [60, 40, 200, 255]],
        "input": {
            "layout": "NCHW",
            "channels": "RGB",
            "dtype": "float32",
            "normalise": "(rgb/255 - mean) / std",
            "mean": list(MEAN),
            "std": list(STD),
            "multiple_of": DOWNSAMPLE,
        },
        "output": {"layout": "NCHW", "dtype": "float32", "kind": "logits"},
        "architecture": {"type": "unet", "widths": list(WIDTHS)},
        "receptive_radius": radius,
        "halo": halo,
        "training": info,
    }


def lineage(training: dict) -> str:
    """Markdown lines on what a fine-tuned version learnt from (empty for `train`)."""
    if "finetuned_from" not in training:
        return ""
    c, before, after = training["corrections"], training["before"], training["after"]
    rows = "\n".join(
        f"| {where} | {k} | {before[where][k]:.3f} | {after[where][k]:.3f} |"
        for where in ("corrections", "in_distribution")
        for k in before[where]
    )
    return f"""- **Fine-tuned from** v{training["finetuned_from"]["version"]} \
(sha256 {training["finetuned_from"]["sha256"][:12]}…) on {c["tiles"]} corrected tiles of \
`{c["store"]}` by {", ".join(c["reviewers"])} ({c["changed_px"]} changed pixels), with \
{training["replay"]:.0%} synthetic replay, {training["steps"]} steps

| validation | class | before | after |
|---|---|---|---|
{rows}
"""


def write_card_markdown(card: dict, path: Path) -> None:
    iou_rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in card["training"]["held_out_iou"].items())
    path.write_text(
        f"""# Model card: {card["name"]} v{card["version"]}

Small fully convolutional UNet (widths {card["architecture"]["widths"]}, no normalisation
layers), trained by `segloop train` on synthetic H&E-like histology from `segloop synth`.

- **Classes**: {", ".join(f"{i} {c}" for i, c in enumerate(card["classes"]))}
- **Input**: (N, 3, H, W) float32 RGB, `(rgb/255 - {card["input"]["mean"]}) / \
{card["input"]["std"]}`; H, W multiples of {card["input"]["multiple_of"]}
- **Output**: (N, 3, H, W) float32 logits
- **Receptive-field radius**: {card["receptive_radius"]} px (measured by gradient);
  **halo** used for exact tiling: {card["halo"]} px (rounded up to the downsampling factor)
- **Training**: {card["training"]["steps"]} steps × batch {card["training"]["batch"]} of \
{card["training"]["patch"]}² patches, AdamW + one-cycle, \
{card["training"]["train_seconds"]} s on a 2-core CPU
- **Parent version**: {card["parent_version"]}
{lineage(card["training"])}
## Held-out IoU (1024² image, seed {HELD_OUT_SEED}, not seen in training)

| class | IoU |
|---|---|
{iou_rows}

## Limits
Trained on H&E-like colours only: `segloop synth --stain shifted` images are out of
distribution by design and segment poorly (that is what the review loop is for).
The same numbers travel in the ONNX file's `metadata_props`.
"""
    )


def model_mpp(card: dict) -> float | None:
    """µm/px the model was trained at: its card's ``mpp`` (``model add --mpp``; null:
    unknown). Cards of segloop's own UNet (``segloop train`` / ``finetune``, trained on
    synthetic slides) have no such key: they are ``SYNTH_MPP`` models."""
    if "mpp" not in card and card.get("name") == "segloop_unet":
        return SYNTH_MPP
    return float(card["mpp"]) if card.get("mpp") else None

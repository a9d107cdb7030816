"""Segmentation scores shared by training, tests, benchmarks and the review server."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segloop.synth.render import CLASS_NAMES


def iou(pred: np.ndarray, truth: np.ndarray, classes: Sequence[str] = CLASS_NAMES) -> dict:
    """Per-class intersection over union of two label arrays of the same shape; a class
    absent from both scores 1.0."""
    out = {}
    for k, name in enumerate(classes):
        inter = np.logical_and(pred == k, truth == k).sum()
        union = np.logical_or(pred == k, truth == k).sum()
        out[name] = float(inter / union) if union else 1.0
    return out


def mean_iou(scores: dict[str, float]) -> float:
    """The mean of per-class IoUs (``iou``'s dict), rounded to 4 decimals."""
    return round(float(np.mean(list(scores.values()))), 4) if scores else 0.0

"""The copilot: a mask proposed from the model's own output, at a click or in a box.

What the store keeps of the model per pixel is its prediction (argmax: the labels with
every human edit rewound) and its confidence (the top class probability, uint8). The
score of class ``c`` is that probability where the prediction is ``c`` and
``1 − confidence`` elsewhere (an upper bound on any other class's probability). A
proposal is

- click: the 8-connected pixels with score ≥ ``threshold`` reached from the click, inside
  a ``WINDOW``² window centred on it (nothing when the click itself scores below);
- box (two corners): the largest 8-connected component of such pixels inside the box.

Edits never change the prediction, so the preview (``POST …/assist``) and the edit that
accepts it (``op: "assist"``, computed again by the same function) propose the same mask.
"""

from __future__ import annotations

import base64
import functools
from typing import Annotated, Protocol

import msgspec
import numpy as np
from scipy import ndimage

from segloop.review import raster
from segloop.review.chunks import ChunkKey
from segloop.review.db import DeltaReader, ReviewDB
from segloop.review.edits import (
    BadEdit,
    Edit,
    Point,
    chunk_keys,
    per_chunk,
    rewind,
    validate,
)

WINDOW = 512  # a click grows at most WINDOW // 2 pixels each way
#: the largest box side: a structure, not a slide (a 2048² box: ~30 MB and ~0.3 s to label)
MAX_SIDE = 2048
EIGHT = np.ones((3, 3), bool)


class Labels(Protocol):
    """What the copilot reads of a reviewed image (``segloop.review.image.ReviewImage``)."""

    tile: int
    shape: tuple[int, ...]
    classes: list[str]
    db: ReviewDB

    def read_chunk(self, layer: str, level: int, cy: int, cx: int) -> np.ndarray: ...


class Assist(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /api/images/{image}/assist`` body: ``points`` one click [[x, y]] or the two
    corners of a box; ``label`` the class to propose; ``threshold`` the least score."""

    points: list[Point]
    label: Annotated[int, msgspec.Meta(ge=0, le=255)]
    threshold: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.5


def region(img: Labels, read, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Level-0 (y1 − y0, x1 − x0) uint8 of the chunks ``read(cy, cx)`` gives."""
    out = np.empty((y1 - y0, x1 - x0), np.uint8)
    t = img.tile
    for cy, cx in chunk_keys((y0, y1, x0, x1), t):
        chunk = read(cy, cx)
        a, c = cy * t, cx * t
        ya, yb = max(a, y0), min(a + chunk.shape[0], y1)
        xa, xb = max(c, x0), min(c + chunk.shape[1], x1)
        out[ya - y0 : yb - y0, xa - x0 : xb - x0] = chunk[ya - a : yb - a, xa - c : xb - c]
    return out


def propose(
    img: Labels, points: list[tuple[int, int]], label: int, threshold: float
) -> tuple[int, int, np.ndarray]:
    """(y0, x0, mask) of the proposal: mask (h, w) uint8, 1 = proposed."""
    h, w = img.shape
    if len(points) == 1:
        x, y = points[0]
        half = WINDOW // 2
        y0, y1, x0, x1 = max(0, y - half), min(h, y + half), max(0, x - half), min(w, x + half)
    else:
        (xa, ya), (xb, yb) = points
        y0, y1, x0, x1 = min(ya, yb), max(ya, yb) + 1, min(xa, xb), max(xa, xb) + 1
        if y1 - y0 > MAX_SIDE or x1 - x0 > MAX_SIDE:
            raise BadEdit(f"box larger than {MAX_SIDE}² pixels")
    edits, deltas = img.db.edits_by_tile(), DeltaReader(img.db)

    def predicted(cy: int, cx: int) -> np.ndarray:
        now, done = img.read_chunk("segmentation", 0, cy, cx), edits.get((cy, cx), ())
        return (
            rewind(now, (deltas.get(e["id"], ChunkKey(0, cy, cx)) for e in done)) if done else now
        )

    prediction = region(img, predicted, y0, y1, x0, x1)
    conf = region(img, functools.partial(img.read_chunk, "confidence", 0), y0, y1, x0, x1)
    score = np.where(prediction == label, conf, 255 - conf)
    keep = (score >= round(threshold * 255)).astype(np.uint8)
    if len(points) == 1:
        sy, sx = points[0][1] - y0, points[0][0] - x0
        mask = raster.flood(keep, sy, sx, True) if keep[sy, sx] else np.zeros_like(keep)
        return y0, x0, mask
    parts, n = ndimage.label(keep, structure=EIGHT)
    if n == 0:
        return y0, x0, keep
    sizes = np.bincount(parts.reshape(-1))[1:]
    return y0, x0, (parts == 1 + int(np.argmax(sizes))).astype(np.uint8)


def rasterise(img: Labels, edit: Edit) -> tuple[list[tuple[int, int]], np.ndarray]:
    """An ``assist`` edit → ``edits.rasterise``'s (keys, masks)."""
    y0, x0, mask = propose(img, edit.points, edit.label, edit.threshold)
    return per_chunk(mask, y0, x0, img.tile)


def preview(img: Labels, body: Assist) -> dict:
    """The proposal for the browser: its box (x0, y0, width, height in level-0 pixels), the
    mask as base64 of ``numpy.packbits`` (rows of ``width`` bits, big-endian), the pixels
    it covers and how many of them it would change."""
    validate(Edit(op="assist", points=body.points, label=body.label), img.shape, len(img.classes))
    y0, x0, mask = propose(img, body.points, body.label, body.threshold)
    h, w = mask.shape
    labels = region(
        img, functools.partial(img.read_chunk, "segmentation", 0), y0, y0 + h, x0, x0 + w
    )
    return {
        "label": body.label,
        "threshold": body.threshold,
        "box": [x0, y0, w, h],
        "mask": base64.b64encode(np.packbits(mask.astype(bool), axis=None)).decode(),
        "pixels": int(mask.sum()),
        "changed_px": int(((mask == 1) & (labels != body.label)).sum()),
    }

"""Mask edits: request bodies (msgspec), rasterisation, pixel deltas.

Coordinates are level-0 pixels, x = column, y = row. An edit becomes a *delta*: for each
touched level-0 chunk "cy/cx", the flat indices of the pixels it changed with their
values before and after. Deltas make undo exact and local (a pixel is reverted only if it
still holds the edit's value, so a later edit by someone else is kept) and make replay
after a crash idempotent.
"""

from __future__ import annotations

from typing import Literal

import msgspec
import numpy as np
from numcodecs import Zstd
from scipy import ndimage
from skimage.draw import polygon

MAX_POINTS = 10_000
MAX_RADIUS = 256
MAX_BOX = 4096  # polygon / fill / relabel work inside at most MAX_BOX² pixels
_CODEC = Zstd(level=3)

Point = tuple[int, int]


class Edit(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /api/images/{image}/edits`` body.

    op: brush / erase (stroke through ``points`` with ``radius``), polygon (fill the
    polygon ``points``), fill (flood fill of the 4-connected same-label region at
    ``points[0]``), relabel (the 8-connected component at ``points[0]``). ``label``: new
    class (erase → 0). ``base``: {"cy/cx": version} of the chunks the client drew on; a
    different current version → 409 (omitted = no check). ``client_id``: the client's
    own id of this edit (≤ 64 chars); re-sending it (lost ack, reload) returns the edit
    already made instead of applying it twice.
    """

    op: Literal["brush", "erase", "polygon", "fill", "relabel"]
    points: list[Point]
    label: int = 0
    radius: int = 8
    base: dict[str, int] | None = None
    client_id: str | None = None


class BadEdit(ValueError):
    """The edit is well-formed JSON but cannot be applied (→ 400)."""


def validate(edit: Edit, shape: tuple[int, int], n_classes: int) -> None:
    h, w = shape
    if not edit.points:
        raise BadEdit("points must not be empty")
    if len(edit.points) > MAX_POINTS:
        raise BadEdit(f"at most {MAX_POINTS} points per edit")
    if not 0 <= edit.label < n_classes:
        raise BadEdit(f"label must be in 0..{n_classes - 1}")
    if not 1 <= edit.radius <= MAX_RADIUS:
        raise BadEdit(f"radius must be in 1..{MAX_RADIUS}")
    for x, y in edit.points:
        if not (0 <= x < w and 0 <= y < h):
            raise BadEdit(f"point ({x}, {y}) is outside the {w}×{h} image")
    if edit.client_id is not None and not 0 < len(edit.client_id) <= 64:
        raise BadEdit("client_id must be 1 to 64 characters")
    if edit.op == "polygon" and len(edit.points) < 3:
        raise BadEdit("a polygon needs at least 3 points")
    for key in edit.base or {}:
        parts = key.split("/")
        if len(parts) != 2 or not all(p.isdigit() and len(p) < 9 for p in parts):
            raise BadEdit(f'base keys are "cy/cx" chunk indices, got {key!r}')


def box(edit: Edit, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the pixels the edit may change, clipped to the image."""
    h, w = shape
    pts = np.asarray(edit.points)
    if edit.op in ("brush", "erase"):
        r = edit.radius
        y0, y1 = pts[:, 1].min() - r, pts[:, 1].max() + r + 1
        x0, x1 = pts[:, 0].min() - r, pts[:, 0].max() + r + 1
    elif edit.op == "polygon":
        y0, y1, x0, x1 = pts[:, 1].min(), pts[:, 1].max() + 1, pts[:, 0].min(), pts[:, 0].max() + 1
        if y1 - y0 > MAX_BOX or x1 - x0 > MAX_BOX:
            raise BadEdit(f"polygon larger than {MAX_BOX}² pixels")
    else:  # fill / relabel: a bounded window centred on the seed
        x, y = edit.points[0]
        half = MAX_BOX // 2
        y0, y1, x0, x1 = y - half, y + half, x - half, x + half
    return max(0, int(y0)), min(h, int(y1)), max(0, int(x0)), min(w, int(x1))


def rasterise(edit: Edit, region: np.ndarray, origin: tuple[int, int]) -> np.ndarray:
    """New labels for ``region`` (h, w) uint8 whose top-left pixel is ``origin`` (y, x)."""
    out = region.copy()
    oy, ox = origin
    label = 0 if edit.op == "erase" else edit.label
    if edit.op in ("brush", "erase"):
        _stamp_disks(out, stroke_centres(edit) - (ox, oy), edit.radius + 0.5, label)
    elif edit.op == "polygon":
        pts = np.asarray(edit.points)
        rr, cc = polygon(pts[:, 1] - oy, pts[:, 0] - ox, shape=out.shape)
        out[rr, cc] = label
    else:
        x, y = edit.points[0]
        seed = (y - oy, x - ox)
        structure = ndimage.generate_binary_structure(2, 1 if edit.op == "fill" else 2)
        components, _ = ndimage.label(region == region[seed], structure=structure)
        out[components == components[seed]] = label
    return out


def stroke_centres(edit: Edit) -> np.ndarray:
    """(n, 2) float64 (x, y) disk centres along a brush stroke: its points, and between
    consecutive points evenly spaced centres at most max(1, radius / 2) apart."""
    pts = np.asarray(edit.points, np.float64)
    step = max(1.0, edit.radius / 2)
    seg = np.diff(pts, axis=0)
    n = np.ceil(np.hypot(seg[:, 0], seg[:, 1]) / step).astype(np.int64)
    owner = np.repeat(np.arange(len(seg)), n)  # segment of each interpolated centre
    k = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n) + 1  # 1..n within it
    t = (k / np.repeat(n, n))[:, None]
    return np.concatenate([pts[:1], pts[owner] + seg[owner] * t])


def _stamp_disks(out: np.ndarray, centres: np.ndarray, r: float, label: int) -> None:
    """Set ``label`` in ``out`` (h, w) uint8 wherever a pixel centre lies strictly inside
    a disk of radius ``r`` around one of ``centres`` (n, 2) float (x, y), in ``out``'s
    pixel coordinates (the pixels of ``skimage.draw.disk``). Each disk is one column
    interval per row; the intervals are summed into a difference array, one pass."""
    h, w = out.shape
    k = int(np.ceil(r))
    x, y = centres[:, :1], centres[:, 1:]
    rows = np.floor(y).astype(np.int64) + np.arange(-k, k + 2)  # (n, 2k + 2) candidate rows
    dy2 = (rows - y) ** 2
    ok = (dy2 < r * r) & (rows >= 0) & (rows < h)
    half = np.sqrt(np.maximum(r * r - dy2, 0))
    lo = np.floor(x - half).astype(np.int64) + 1  # first column with |col − x| < half
    hi = np.ceil(x + half).astype(np.int64)  # one past the last
    # the rims by the same test as inside, so sqrt's rounding cannot move them
    lo += (lo - x) ** 2 + dy2 >= r * r
    lo -= (lo - 1 - x) ** 2 + dy2 < r * r
    hi -= (hi - 1 - x) ** 2 + dy2 >= r * r
    hi += (hi - x) ** 2 + dy2 < r * r
    lo, hi = np.clip(lo, 0, w), np.clip(hi, 0, w)
    ok &= lo < hi
    n = h * (w + 1)
    starts = np.bincount((rows * (w + 1) + lo)[ok], minlength=n)
    ends = np.bincount((rows * (w + 1) + hi)[ok], minlength=n)
    diff = (starts - ends).reshape(h, w + 1)
    out[np.cumsum(diff[:, :w], axis=1) > 0] = label


def chunk_keys(b: tuple[int, int, int, int], chunk: int) -> list[tuple[int, int]]:
    y0, y1, x0, x1 = b
    return [
        (cy, cx)
        for cy in range(y0 // chunk, (y1 - 1) // chunk + 1)
        for cx in range(x0 // chunk, (x1 - 1) // chunk + 1)
    ]


Delta = dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # "cy/cx" → idx, before, after


def pack(delta: Delta) -> bytes:
    """Delta → compressed msgpack bytes (for the edits table)."""
    raw = {
        k: (i.astype("<u4").tobytes(), b.tobytes(), a.tobytes()) for k, (i, b, a) in delta.items()
    }
    return bytes(_CODEC.encode(msgspec.msgpack.encode(raw)))


def unpack(blob: bytes) -> Delta:
    raw = msgspec.msgpack.decode(bytes(_CODEC.decode(blob)))
    return {
        k: (
            np.frombuffer(i, "<u4").astype(np.intp),
            np.frombuffer(b, np.uint8),
            np.frombuffer(a, np.uint8),
        )
        for k, (i, b, a) in raw.items()
    }


def rewind(labels: np.ndarray, key: str, deltas: list[Delta]) -> np.ndarray:
    """(h, w) uint8 labels of chunk ``key`` as they were before ``deltas`` (newest
    first): each delta's "before" values are put back. Rewinding every edit of a chunk
    gives the model's prediction."""
    out = labels.copy().reshape(-1)
    for delta in deltas:
        if key in delta:
            idx, before, _ = delta[key]
            out[idx] = before
    return out.reshape(labels.shape)

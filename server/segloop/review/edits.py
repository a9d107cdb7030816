"""Mask edits: request bodies (msgspec), rasterisation, pixel deltas.

Coordinates are level-0 pixels, x = column, y = row. An edit becomes a *delta*: for each
touched level-0 chunk "cy/cx", the flat indices of the pixels it changed with their
values before and after. Deltas make undo exact and local (a pixel is reverted only if it
still holds the edit's value, so a later edit by someone else is kept) and make replay
after a crash idempotent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Annotated, Literal

import msgspec
import numpy as np
from numcodecs import Zstd

from segloop.review import raster
from segloop.review.chunks import ChunkKey

MAX_POINTS = 10_000
MAX_RADIUS = 256
MAX_BOX = 4096  # polygon / fill / relabel work inside at most MAX_BOX² pixels
#: per-edit budget (→ 413): pixels covered, level-0 chunks touched, and rows swept (the
#: sum over a stroke's segments or a polygon's edges of the rows each one spans)
MAX_EDIT_PIXELS = MAX_BOX * MAX_BOX
MAX_EDIT_CHUNKS = 256
MAX_EDIT_ROWS = 1 << 24
_CODEC = Zstd(level=3)

Coord = Annotated[int, msgspec.Meta(ge=0, lt=2**31)]
Point = tuple[Coord, Coord]


class Edit(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /api/images/{image}/edits`` body.

    op: brush / erase (stroke through ``points`` with ``radius``), polygon (fill the
    polygon ``points``), fill (flood fill of the 4-connected same-label region at
    ``points[0]``), relabel (the 8-connected component at ``points[0]``), assist (the
    copilot's proposal for ``points``: one click, or two box corners, at ``threshold``;
    see ``segloop.review.assist``). ``label``: new class (erase → 0). ``only``: change
    only pixels that are of this class now (0 = only empty ones; napari's "preserve
    labels"), omitted = any. ``base``: {"cy/cx": version} of the chunks the client drew on; a
    different current version → 409 (omitted = no check). ``client_id``: the client's
    own id of this edit (≤ 64 chars); re-sending it (lost ack, reload) returns the edit
    already made instead of applying it twice.
    """

    op: Literal["brush", "erase", "polygon", "fill", "relabel", "assist"]
    points: list[Point]
    label: Annotated[int, msgspec.Meta(ge=0, le=255)] = 0
    radius: Annotated[int, msgspec.Meta(ge=0, lt=2**31)] = 8
    threshold: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.5
    only: Annotated[int, msgspec.Meta(ge=0, le=255)] | None = None
    base: dict[str, Annotated[int, msgspec.Meta(ge=0, lt=2**62)]] | None = None
    client_id: str | None = None


class BadEdit(ValueError):
    """The edit is well-formed JSON but cannot be applied (→ 400)."""


class TooLarge(BadEdit):
    """The edit is over the per-edit budget (→ 413)."""


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
    pts = np.asarray(edit.points, np.int64)
    outside = (pts[:, 0] >= w) | (pts[:, 1] >= h)
    if outside.any():
        x, y = pts[np.argmax(outside)]
        raise BadEdit(f"point ({x}, {y}) is outside the {w}×{h} image")
    if edit.client_id is not None and not 0 < len(edit.client_id) <= 64:
        raise BadEdit("client_id must be 1 to 64 characters")
    if edit.op == "polygon" and len(edit.points) < 3:
        raise BadEdit("a polygon needs at least 3 points")
    if edit.op == "assist" and len(edit.points) > 2:
        raise BadEdit("assist takes one point (a click) or two (the corners of a box)")
    if edit.only is not None and not edit.only < n_classes:
        raise BadEdit(f"only must be in 0..{n_classes - 1}")
    for key in edit.base or {}:
        if key.count("/") != 1 or not _is_key(key):
            raise BadEdit(f'base keys are "cy/cx" chunk indices, got {key!r}')


def _is_key(text: str) -> bool:
    try:
        ChunkKey.parse(text)
    except ValueError:
        return False
    return True


def box(edit: Edit, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the pixels a fill or relabel may change: a bounded window centred
    on the seed, clipped to the image."""
    h, w = shape
    x, y = edit.points[0]
    half = MAX_BOX // 2
    return max(0, y - half), min(h, y + half), max(0, x - half), min(w, x + half)


def rasterise(
    edit: Edit, shape: tuple[int, int], tile: int, read: Callable[[int, int], np.ndarray]
) -> tuple[list[tuple[int, int]], np.ndarray]:
    """The pixels the edit paints, per level-0 chunk: (keys, masks) with keys [(cy, cx)]
    of the touched chunks and masks (len(keys), tile, tile) uint8 (1 = painted; chunks at
    the image's edge use their top-left part). ``read(cy, cx)`` → the chunk's labels (fill
    and relabel). Raises ``TooLarge`` over the per-edit budget, before painting."""
    if edit.op in ("fill", "relabel"):
        return _flood(edit, shape, tile, read)
    h, w = shape
    pts = np.asarray(edit.points, np.float64)
    if edit.op == "polygon":
        y0, y1 = pts[:, 1].min(), pts[:, 1].max() + 1
        if y1 - y0 > MAX_BOX or pts[:, 0].max() + 1 - pts[:, 0].min() > MAX_BOX:
            raise BadEdit(f"polygon larger than {MAX_BOX}² pixels")
        ys = np.stack([pts[:, 1], np.roll(pts[:, 1], -1)])
        rows = np.ceil(ys.max(0)) - np.ceil(ys.min(0))
        kernel, args, r = raster.polygon, (), 0.0
    else:
        r = edit.radius + 0.5
        if len(pts) > 1:  # repeated points add nothing but work
            pts = pts[np.r_[True, (np.diff(pts, axis=0) != 0).any(axis=1)]]
        ys = np.stack([pts[:-1, 1], pts[1:, 1]]) if len(pts) > 1 else pts[:, 1:].T
        rows = ys.max(0) - ys.min(0) + 2 * r + 1
        kernel, args = raster.stroke, (r,)
    if rows.sum() > MAX_EDIT_ROWS:
        raise TooLarge(_too_large("spans", int(rows.sum()), MAX_EDIT_ROWS, "rows in all"))
    gy0 = int(max(0, pts[:, 1].min() - r)) // tile
    gx0 = int(max(0, pts[:, 0].min() - r)) // tile
    gy1 = int(min(h - 1, pts[:, 1].max() + r)) // tile
    gx1 = int(min(w - 1, pts[:, 0].max() + r)) // tile
    slots = np.zeros((gy1 - gy0 + 1, gx1 - gx0 + 1), np.int64)
    none = np.zeros((0, tile, tile), np.uint8)
    covered = kernel(pts, *args, h, w, tile, gy0, gx0, slots, none, False)
    _check_budget(covered, int(np.count_nonzero(slots)))
    cy, cx = np.nonzero(slots)
    slots[cy, cx] = np.arange(len(cy))
    masks = np.zeros((len(cy), tile, tile), np.uint8)
    kernel(pts, *args, h, w, tile, gy0, gx0, slots, masks, True)
    return [(int(a) + gy0, int(b) + gx0) for a, b in zip(cy, cx, strict=True)], masks


def _flood(
    edit: Edit, shape: tuple[int, int], tile: int, read: Callable[[int, int], np.ndarray]
) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Fill / relabel: the connected region at the seed, inside ``box``."""
    y0, y1, x0, x1 = box(edit, shape)
    keys = chunk_keys((y0, y1, x0, x1), tile)
    region = np.empty((y1 - y0, x1 - x0), np.uint8)
    for cy, cx in keys:
        chunk = read(cy, cx)
        a, c = cy * tile, cx * tile
        ya, yb = max(a, y0), min(a + chunk.shape[0], y1)
        xa, xb = max(c, x0), min(c + chunk.shape[1], x1)
        region[ya - y0 : yb - y0, xa - x0 : xb - x0] = chunk[ya - a : yb - a, xa - c : xb - c]
    x, y = edit.points[0]
    mask = raster.flood(region, y - y0, x - x0, edit.op == "relabel")
    return per_chunk(mask, y0, x0, tile)


def per_chunk(
    mask: np.ndarray, y0: int, x0: int, tile: int
) -> tuple[list[tuple[int, int]], np.ndarray]:
    """A (h, w) mask whose top-left pixel is (y0, x0) → ``rasterise``'s (keys, masks) of
    the chunks it touches; ``TooLarge`` over the per-edit budget."""
    h, w = mask.shape
    out_keys, masks = [], []
    for cy, cx in chunk_keys((y0, y0 + h, x0, x0 + w), tile):
        a, c = cy * tile, cx * tile
        part = mask[max(0, a - y0) : a + tile - y0, max(0, c - x0) : c + tile - x0]
        if part.any():
            m = np.zeros((tile, tile), np.uint8)
            ya, xa = max(a, y0) - a, max(c, x0) - c
            m[ya : ya + part.shape[0], xa : xa + part.shape[1]] = part
            out_keys.append((cy, cx))
            masks.append(m)
    _check_budget(int(np.count_nonzero(mask)), len(out_keys))
    return out_keys, np.stack(masks) if masks else np.zeros((0, tile, tile), np.uint8)


def _too_large(what: str, n: int, limit: int, unit: str) -> str:
    return f"edit too large: it {what} {n} {unit}, more than the {limit} allowed; split it"


def _check_budget(pixels: int, chunks: int) -> None:
    if pixels > MAX_EDIT_PIXELS:
        raise TooLarge(_too_large("covers", pixels, MAX_EDIT_PIXELS, "pixels"))
    if chunks > MAX_EDIT_CHUNKS:
        raise TooLarge(_too_large("touches", chunks, MAX_EDIT_CHUNKS, "chunks"))


def stroke_centres(edit: Edit) -> np.ndarray:
    """(n, 2) float64 (x, y) disk centres along a brush stroke: its points, and between
    consecutive points evenly spaced centres at most max(1, radius / 2) apart (a stroke's
    disks; the server paints the capsules between them, a superset)."""
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
    a disk of radius ``r`` around one of ``centres`` (n, 2) float (x, y): each disk is a
    one-point stroke of ``raster.stroke`` (the pixels of ``skimage.draw.disk``)."""
    h, w = out.shape
    size = max(h, w)
    mask = np.zeros((1, size, size), np.uint8)
    slots = np.zeros((1, 1), np.int64)
    for c in centres:
        raster.stroke(c[None].astype(np.float64), float(r), h, w, size, 0, 0, slots, mask, True)
    out[mask[0, :h, :w].astype(bool)] = label


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
    return {k: unpack_part(part) for k, part in unpack_lazy(blob)[1].items()}


def unpack_lazy(blob: bytes) -> tuple[int, dict[str, msgspec.Raw]]:
    """(decompressed bytes, {"cy/cx": its part, still msgpack}) of a packed delta."""
    raw = bytes(_CODEC.decode(blob))
    return len(raw), msgspec.msgpack.decode(raw, type=dict[str, msgspec.Raw])


def unpack_part(part: msgspec.Raw) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One chunk's (idx intp, before uint8, after uint8) of ``unpack_lazy``."""
    i, b, a = msgspec.msgpack.decode(part)
    return (
        np.frombuffer(i, "<u4").astype(np.intp),
        np.frombuffer(b, np.uint8),
        np.frombuffer(a, np.uint8),
    )


def rewind(
    labels: np.ndarray, parts: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray] | None]
) -> np.ndarray:
    """(h, w) uint8 labels of one chunk as they were before the edits whose parts of this
    chunk are ``parts`` (newest first; None = the edit left the chunk alone): each "before"
    is put back. Rewinding every edit of a chunk gives the model's prediction."""
    out = labels.copy().reshape(-1)
    for part in parts:
        if part is not None:
            idx, before, _ = part
            out[idx] = before
    return out.reshape(labels.shape)

"""The largest edits the per-edit budget allows (``review/edits.py``), for benchmarks and
the soak test: the most points, with the rows swept (what the rasterisers' time follows)
just under ``MAX_EDIT_ROWS``, inside a square that stays within the pixel and chunk
budgets.

- polygon: a comb of ``MAX_POINTS`` corners whose teeth are narrower than a pixel, so
  every row through them crosses thousands of edges, on a solid band;
- stroke: ``MAX_POINTS`` points zig-zagging between the square's left and right borders
  while sweeping up and down it, radius 64.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from segloop.review.edits import (
    MAX_BOX,
    MAX_EDIT_CHUNKS,
    MAX_EDIT_PIXELS,
    MAX_EDIT_ROWS,
    MAX_POINTS,
)

#: share of MAX_EDIT_ROWS used (rounding of the rasterisers' row counts stays inside)
_FILL = 0.99
STROKE_RADIUS = 64


def square(shape: tuple[int, int], tile: int) -> int:
    """Side of the square at (0, 0) the worst edits stay in: within the image, the
    polygon box and the chunk budget."""
    per_side = math.isqrt(MAX_EDIT_CHUNKS)
    return min(shape[0], shape[1], MAX_BOX, per_side * tile)


def worst_polygon(shape: tuple[int, int], tile: int, label: int = 1) -> dict[str, Any]:
    """An edit body: the comb polygon (see the module docstring)."""
    s = square(shape, tile)
    teeth = MAX_POINTS - 2
    depth = max(1, min(s - 2, int((_FILL * MAX_EDIT_ROWS - 2 * s) // teeth)))
    # a row through the teeth counts about one pixel per tooth (a span includes its ends):
    # the solid band under them is as tall as the pixel budget leaves room for
    in_teeth = depth * max(s, teeth // 2 + 1)
    band = max(1, min(s - 1 - depth, int((_FILL * MAX_EDIT_PIXELS - in_teeth) // s)))
    top = [[round(k * (s - 1) / (teeth - 1)), depth if k % 2 else 0] for k in range(teeth)]
    bottom = depth + band
    return {"op": "polygon", "points": [*top, [s - 1, bottom], [0, bottom]], "label": label}


def worst_stroke(shape: tuple[int, int], tile: int, label: int = 2) -> dict[str, Any]:
    """An edit body: the zig-zag stroke (see the module docstring)."""
    s = square(shape, tile)
    r = min(STROKE_RADIUS, max(1, (s - 2) // 4))
    lo, hi = r, s - 1 - r  # centres: the capsules stay inside the square
    per_segment = 2 * (r + 0.5) + 1  # rows a segment sweeps beyond its own dy
    step = max(1, min(hi - lo, int(_FILL * MAX_EDIT_ROWS / (MAX_POINTS - 1) - per_segment)))
    span = hi - lo  # y: a triangle wave between lo and hi, ``step`` rows a segment
    points = []
    for k in range(MAX_POINTS):
        p = k * step % (2 * span) if span else 0
        points.append([lo if k % 2 == 0 else hi, lo + (p if p <= span else 2 * span - p)])
    return {"op": "brush", "points": points, "label": label, "radius": r}


def rows_swept(edit: dict[str, Any]) -> int:
    """The rows the budget counts for a polygon or stroke body (as ``edits.rasterise``)."""
    pts = edit["points"]
    if edit["op"] == "polygon":
        pairs = zip(pts, pts[1:] + pts[:1], strict=True)
        return sum(abs(a[1] - b[1]) for a, b in pairs)
    extra = 2 * (edit["radius"] + 0.5) + 1
    return int(sum(abs(a[1] - b[1]) + extra for a, b in itertools.pairwise(pts)))

"""The worst-case edits (``review/worst.py``) that bench serve and the soak send: within
the per-edit budget (accepted, never a 413) and at its row limit where the image allows."""

from __future__ import annotations

import msgspec
import pytest

from segloop.review.edits import MAX_EDIT_ROWS, MAX_POINTS, Edit, rasterise, validate
from segloop.review.worst import rows_swept, worst_polygon, worst_stroke


@pytest.mark.parametrize("make", [worst_polygon, worst_stroke])
def test_worst_edits_fit_the_budget(make):
    shape, tile = (1100, 1000), 256
    body = make(shape, tile)
    edit = msgspec.convert(body, Edit)
    validate(edit, shape, 3)
    keys, masks = rasterise(edit, shape, tile, lambda cy, cx: None)  # raises over budget
    assert len(body["points"]) == MAX_POINTS and keys and masks.any()
    assert rows_swept(body) <= MAX_EDIT_ROWS


@pytest.mark.parametrize("make", [worst_polygon, worst_stroke])
def test_worst_edits_reach_the_row_budget_on_a_large_image(make):
    """On a 4096² store the rows swept come within 20 % of the budget (not rasterised
    here: seconds of kernel time)."""
    body = make((4096, 4096), 512)
    assert 0.8 * MAX_EDIT_ROWS <= rows_swept(body) <= MAX_EDIT_ROWS

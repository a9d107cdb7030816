"""segloop.review.edits: brush rasterising agrees with skimage.draw.disk, pixel for pixel."""

from __future__ import annotations

import numpy as np
from skimage.draw import disk

from segloop.review.edits import Edit, _stamp_disks, stroke_centres


def test_stamped_disks_are_skimage_disks():
    rng = np.random.default_rng(0)
    for _ in range(500):
        h, w = rng.integers(5, 200, 2)
        r = rng.integers(1, 60) + 0.5
        centres = rng.uniform(-80, 280, (5, 2))  # some off the region, some half on it
        want = np.zeros((h, w), np.uint8)
        for x, y in centres:
            rr, cc = disk((y, x), r, shape=want.shape)
            want[rr, cc] = 1
        got = np.zeros_like(want)
        _stamp_disks(got, centres, r, 1)
        np.testing.assert_array_equal(got, want)


def test_stroke_centres_are_at_most_half_a_radius_apart():
    edit = Edit(op="brush", points=[(0, 0), (100, 0), (100, 3), (100, 3)], radius=10)
    c = stroke_centres(edit)
    steps = np.hypot(*np.diff(c, axis=0).T)
    assert c[0].tolist() == [0, 0] and c[-1].tolist() == [100, 3]
    assert steps.max() <= 5 + 1e-9 and len(c) == 1 + 20 + 1 + 0

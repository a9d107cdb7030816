"""The work queue's policy: which tile a reviewer is lent next, and for how long.

A tile is lent (leased) to one user at a time, most uncertain first, skipping tiles that
are lent to someone else or whose review state was set; each user holds one lease, which
expires after ``minutes`` (``LEASE_MINUTES`` unless asked, at most ``MAX_MINUTES``). The
database keeps the leases (``ReviewDB.lease``); this module only chooses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from segloop.review.image import ReviewImage

LEASE_MINUTES = 10
MAX_MINUTES = 240


def valid_minutes(minutes: float) -> bool:
    """Whether a lease of ``minutes`` may be asked for: (0, ``MAX_MINUTES``]."""
    return 0 < minutes <= MAX_MINUTES


def first_free(
    order: np.ndarray, width: int, taken: set[tuple[int, int]], done: set[tuple[int, int]]
) -> tuple[int, int] | None:
    """The first tile of ``order`` (flat indices into a grid ``width`` tiles wide) that is
    neither ``taken`` nor ``done``."""
    for flat in order:
        tile = divmod(int(flat), width)
        if tile not in taken and tile not in done:
            return tile
    return None


def lease_next(img: ReviewImage, user: dict[str, Any], minutes: float) -> dict[str, Any] | None:
    """Lend ``user`` the next tile of ``img`` (on its writer thread): {tile, uncertainty,
    expires, remaining}, or None when every tile is lent or reviewed."""
    u = img.uncertainty()
    order = np.argsort(-u, axis=None, kind="stable")  # most uncertain first (ties: rows)
    tile, expires, busy = img.db.lease(
        user["id"], lambda taken, done: first_free(order, u.shape[1], taken, done), minutes
    )
    if tile is None:
        return None
    return {
        "tile": list(tile),
        "uncertainty": round(float(u[tile]), 2),
        "expires": expires,
        "remaining": u.size - busy - 1,
    }

"""Feedback quality (``GET /api/images/{image}/stats``): who did what, and how well
annotators agree with reviewers.

Agreement is measured on *doubly-seen* tiles: a level-0 tile an annotator edited and a
reviewer (or admin) then edited or gave a final state. It is the IoU, per class and
averaged over the classes present, between the tile's labels right after the
annotator's last edit and its labels now (the reviewer's verdict): 1.0 = the reviewer
changed nothing.
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

from segloop.review.chunks import ChunkKey
from segloop.review.db import EXPERTS, DeltaReader
from segloop.review.edits import rewind
from segloop.review.image import SEG, ReviewImage
from segloop.scores import iou


def user_stats(img: ReviewImage) -> list[dict[str, Any]]:
    """Per user: edits by op, pixels changed, own proposals by outcome, tiles by the
    review state they set, median seconds from lease to final state."""
    users = {u["id"]: u for u in img.db.users()}
    rows = img.db.stats_rows()
    out = {
        uid: {
            "user": u["name"],
            "role": u["role"],
            "edits": {},
            "pixels": 0,
            "proposals": {},
            "tiles": {},
            "median_seconds_per_tile": None,
        }
        for uid, u in users.items()
    }
    for r in rows["edits"]:
        s = out[r["user_id"]]
        s["edits"][r["op"]] = s["edits"].get(r["op"], 0) + r["n"]
        s["pixels"] += r["px"] or 0
        if s["role"] == "annotator" and r["op"] not in ("undo", "redo"):
            s["proposals"][r["status"]] = s["proposals"].get(r["status"], 0) + r["n"]
    for r in rows["states"]:
        out[r["user_id"]]["tiles"][r["state"]] = r["n"]
    by_user: dict[int, list[float]] = {}
    for r in rows["seconds"]:
        by_user.setdefault(r["user_id"], []).append(r["seconds"])
    for uid, values in by_user.items():
        out[uid]["median_seconds_per_tile"] = round(statistics.median(values), 1)
    return [s for s in out.values() if s["edits"] or s["tiles"]]


def agreement(img: ReviewImage) -> dict[str, Any]:
    """Annotator–reviewer IoU on doubly-seen tiles (see the module docstring)."""
    final = img.db.expert_verdicts()
    tiles = []
    deltas = DeltaReader(img.db)  # one delta in memory at a time (and a few recent ones)
    for (cy, cx), tile_edits in sorted(img.db.edits_by_tile().items()):
        key = ChunkKey(0, cy, cx)
        last = next((i for i, e in enumerate(tile_edits) if e["role"] == "annotator"), None)
        if last is None:
            continue
        after = tile_edits[:last]  # everything newer than the annotator's last edit
        expert = next((e["user"] for e in after if e["role"] in EXPERTS), final.get((cy, cx)))
        if expert is None:
            continue
        now = img.read_chunk(SEG, 0, cy, cx)
        theirs = rewind(now, (deltas.get(e["id"], key) for e in after))
        scores = iou(theirs, now, img.classes)
        seen = np.union1d(np.unique(theirs), np.unique(now))
        present = [scores[img.classes[k]] for k in seen if k < len(img.classes)]
        tiles.append(
            {
                "tile": [cy, cx],
                "annotator": tile_edits[last]["user"],
                "reviewer": expert,
                "iou": scores,
                "mean_iou": float(np.mean(present)),
                "changed_px": int((theirs != now).sum()),
            }
        )
    mean = float(np.mean([t["mean_iou"] for t in tiles])) if tiles else None
    return {"tiles": len(tiles), "mean_iou": mean, "per_tile": tiles}

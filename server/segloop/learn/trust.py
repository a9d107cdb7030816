"""Which human feedback a model learns from: the trust rule.

A level-0 tile enters training when a human vouched for it and nothing in it is
untrusted:

- **experts** (reviewers, admins): their final states (accepted, corrected) and their
  edits are trusted, weight 1;
- **annotators**: an edit a reviewer *approved* is trusted like an expert's, and so is
  one a reviewer's later verdict on its tile (accepted, corrected) covers; a *rejected*
  one is reverted by the rejection, so its pixels are back as they were and never train;
  a proposal still *pending* (and newer than any expert verdict on its tile) enters only
  if its author's measured agreement with the reviewers (``review.stats.agreement``: mean
  IoU on the tiles both worked on) is at least ``MIN_AGREEMENT`` over at least
  ``MIN_SEEN`` tiles, weighted by that agreement (a tile's chance of being sampled for a
  training crop). Below that, the tile waits for a reviewer: it is listed under
  ``excluded`` with the reason.

A tile whose only human mark is an annotator's ``correction_proposed`` state (with no
edit) has nothing vouched for yet and does not enter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from segloop.review.db import EXPERTS
from segloop.review.image import ReviewImage
from segloop.review.stats import agreement

#: an annotator's pending proposals train only above this agreement with reviewers …
MIN_AGREEMENT = 0.9
#: … measured on at least this many tiles a reviewer also worked on
MIN_SEEN = 3


@dataclass
class TrainingSet:
    """tiles: (cy, cx) → sampling weight in (0, 1]; excluded: [{tile, why}]; annotators:
    name → {agreement, seen, trusted}."""

    tiles: dict[tuple[int, int], float] = field(default_factory=dict)
    excluded: list[dict[str, Any]] = field(default_factory=list)
    annotators: dict[str, dict[str, Any]] = field(default_factory=dict)


def annotator_trust(img: ReviewImage) -> dict[str, dict[str, Any]]:
    """name → {agreement (mean IoU or None), seen (tiles), trusted (bool)}."""
    per: dict[str, list[float]] = {}
    for t in agreement(img)["per_tile"]:
        per.setdefault(t["annotator"], []).append(t["mean_iou"])
    out = {}
    for name, scores in per.items():
        mean = sum(scores) / len(scores)
        out[name] = {
            "agreement": round(mean, 4),
            "seen": len(scores),
            "trusted": len(scores) >= MIN_SEEN and mean >= MIN_AGREEMENT,
        }
    return out


def training_set(img: ReviewImage) -> TrainingSet:
    """The tiles of ``img`` a model may learn from now (see the module docstring)."""
    out = TrainingSet(annotators=annotator_trust(img))
    states, edits = img.db.final_states(), img.db.edits_by_tile()
    for tile in sorted(set(states) | set(edits)):
        tile_edits, state = edits.get(tile, []), states.get(tile)
        verdict = state["updated"] if state and state["role"] in EXPERTS else -1.0
        # proposals still pending that no expert verdict on the tile came after
        pending = {
            e["user"] for e in tile_edits if e["status"] == "proposed" and e["created"] > verdict
        }
        weight = 1.0
        why = None
        if tile not in states and all(
            e["status"] == "rejected" or e["op"] == "reject" for e in tile_edits
        ):
            why = "only rejected proposals (reverted): nothing vouched for"
        for name in sorted(pending) if why is None else ():
            trust = out.annotators.get(name, {"agreement": None, "seen": 0, "trusted": False})
            if not trust["trusted"]:
                why = (
                    f"pending proposal of {name} (agreement {trust['agreement']} on "
                    f"{trust['seen']} tiles; needs ≥ {MIN_AGREEMENT} on ≥ {MIN_SEEN})"
                )
                break
            weight = min(weight, trust["agreement"])
        if why is not None:
            out.excluded.append({"tile": list(tile), "why": why})
            continue
        out.tiles[tile] = weight
    return out

"""``segloop export-corrections``: reviewed tiles of a store → training pairs.

```
OUT/
  index.json        {"format": "segloop-corrections", "version": 1, classes, colors,
                     model, filters, items: [{file, tile, box, state, reviewer, role,
                     seconds, updated, model_version, edits, editors, changed_px, …}]}
  tiles/t<ty>_<tx>.npz
      image       (h, w, C) source dtype   the tile's pixels (level 0)
      prediction  (h, w) uint8             the model's labels (every edit rewound)
      corrected   (h, w) uint8             the labels now, after human edits
      changed     (h, w) bool              prediction != corrected
      ignore      (h, w) bool              pixels no human vouched for (train: skip)
```
A tile is exported when a human accepted it or marked it corrected (every pixel
vouched for: ``ignore`` all false), or edited it without a final state (only the pixels
the edits changed are vouched for). ``--approved-only`` keeps tiles whose final state a
reviewer or admin set and that no pending annotator proposal touches. ``index.json`` is
written last: a folder without it is an unfinished export.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from segloop.errors import UserError
from segloop.io.ome_zarr import array_path, own_path, read_record
from segloop.review.chunks import ChunkKey
from segloop.review.db import DB_NAME, EXPERTS, DeltaReader, ReviewDB, require_intact
from segloop.review.edits import rewind
from segloop.review.source_image import StoreImage

FORMAT = "segloop-corrections"
FORMAT_VERSION = 1
INDEX = "index.json"


def _prepare(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out} exists and is not empty; pass --overwrite or choose another")
        index = out / INDEX
        if not (index.exists() or (out / "tiles").is_dir()):
            raise UserError(
                f"{out} is not a corrections export; refusing to delete it even with --overwrite"
            )
        shutil.rmtree(out)
    (out / "tiles").mkdir(parents=True, exist_ok=True)


def export_corrections(
    store: Path,
    out: Path,
    approved_only: bool = False,
    since: float | None = None,
    overwrite: bool = False,
    tiles: dict[tuple[int, int], float] | None = None,
    labels: Callable[[int, int], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Write the training pairs of ``store`` into ``out``; returns the index.

    ``tiles``: only these level-0 tiles, each item given its ``weight`` (the trust rule,
    ``segloop.learn.trust``); ``labels(ty, tx)``: a tile's labels now (a running review
    server's, whose newest edits may not be in zarr yet; default: read from zarr)."""
    record = read_record(store)
    if record is None or record.get("status") != "complete":
        raise UserError(f"{store} is not a finished segloop store")
    if not own_path(store, DB_NAME).exists():
        raise UserError(f"{store} has no review database yet: nothing was reviewed")
    require_intact(store)
    shape = zarr.open_array(store / array_path("segmentation", 0), mode="r").shape
    image = StoreImage(store, record, shape)  # the copy, or the verified input in place
    try:
        _prepare(out, overwrite)
        db = ReviewDB(store)
        try:
            return _export(db, store, record, out, approved_only, since, image, tiles, labels)
        finally:
            db.close()
    finally:
        image.close()


def _export(
    db: ReviewDB,
    store: Path,
    record: dict[str, Any],
    out: Path,
    approved_only: bool,
    since: float | None,
    image: StoreImage,
    tiles: dict[tuple[int, int], float] | None = None,
    labels: Callable[[int, int], np.ndarray] | None = None,
) -> dict[str, Any]:
    """The export, reading one delta at a time (``DeltaReader``); ``image``: the store's
    image layer (``source_image``)."""
    states, edits = db.final_states(), db.edits_by_tile()
    deltas = DeltaReader(db)
    root = zarr.open_group(store, mode="r")
    seg = root[array_path("segmentation", 0)]
    versions = root["tiles/model_version"][...]
    tile = record["grid"]["tile"]
    h, w = seg.shape
    items = []
    for ty, tx in sorted(set(states) | set(edits)):
        if tiles is not None and (ty, tx) not in tiles:
            continue
        state, tile_edits = states.get((ty, tx)), edits.get((ty, tx), [])
        if approved_only and (
            state is None
            or state["role"] not in EXPERTS
            or any(e["status"] == "proposed" for e in tile_edits)
        ):
            continue
        last = max([e["created"] for e in tile_edits] + [state["updated"] if state else 0])
        if since is not None and last < since:
            continue
        y0, y1, x0, x1 = ty * tile, min(h, (ty + 1) * tile), tx * tile, min(w, (tx + 1) * tile)
        corrected = seg[y0:y1, x0:x1] if labels is None else labels(ty, tx)
        key = ChunkKey(0, ty, tx)
        prediction = rewind(corrected, (deltas.get(e["id"], key) for e in tile_edits))
        changed = prediction != corrected
        if state is None and not changed.any():
            continue  # edits that cancel out, nothing vouched for
        ignore = np.zeros_like(changed) if state else ~changed
        name = f"tiles/t{ty:05d}_{tx:05d}.npz"
        np.savez_compressed(
            out / name,
            image=np.moveaxis(image.read(0, (y0, y1, x0, x1)), 0, -1),
            prediction=prediction,
            corrected=corrected,
            changed=changed,
            ignore=ignore,
        )
        editor = tile_edits[0] if tile_edits else None
        items.append(
            {
                "file": name,
                "tile": [ty, tx],
                "box": [y0, y1, x0, x1],
                "state": state["state"] if state else "edited",
                "reason": state["reason"] if state else None,
                "comment": state["comment"] if state else None,
                "reviewer": (state or editor)["user"],
                "role": (state or editor)["role"],
                "seconds": state["seconds"] if state else None,
                "updated": last,
                "model_version": int(versions[ty, tx]),
                "edits": [e["id"] for e in tile_edits],
                "editors": sorted({e["user"] for e in tile_edits}),
                "changed_px": int(changed.sum()),
                "labelled_px": int((~ignore).sum()),
                "weight": 1.0 if tiles is None else tiles[ty, tx],
            }
        )
    index = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "store": store.name,
        "exported": time.time(),
        "filters": {
            "approved_only": approved_only,
            "since": since,
            "tiles": None if tiles is None else "trust rule (segloop.learn.trust)",
        },
        "classes": record["model"]["classes"],
        "model": {k: record["model"].get(k) for k in ("name", "version", "sha256")},
        "tile": tile,
        "items": items,
    }
    tmp = out / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out / INDEX)
    return index

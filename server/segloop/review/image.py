"""One reviewed store: its arrays, versions, and the single writer that applies edits.

All edits of an image go through one writer thread, so they have a total order. The
writer computes the new segmentation chunks (level 0 and the pyramid above) in memory
(``segloop.review.chunks``), commits the delta to SQLite, and answers; one flusher thread
then rewrites the touched shards (zarr shards must have one writer). Tile reads see the
new chunks at once and take a shard's lock only while that shard file is read or replaced.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import numpy as np
import zarr

from segloop.io.ome_zarr import StoreLock, array_path, read_record
from segloop.kernels.pyramid import downsample_mean, downsample_mode
from segloop.review import assist
from segloop.review import db as review_db
from segloop.review.check import DamagedChunk, damaged
from segloop.review.chunks import ChunkCache, ChunkKey
from segloop.review.db import Full, ReviewDB
from segloop.review.edits import (
    BadEdit,
    Delta,
    Edit,
    chunk_keys,
    pack,
    rasterise,
    unpack,
    validate,
)
from segloop.review.source_image import StoreImage
from segloop.review.tile_pack import TilePack

SEG = "segmentation"


class Prediction(NamedTuple):
    """One level-0 tile as a model predicted it: labels and confidence (h, w) uint8,
    uncertainty (``pipeline.uncertainty``), and the model version that made it."""

    labels: np.ndarray
    confidence: np.ndarray
    uncertainty: float
    version: int


class Conflict(Exception):
    """The edit was drawn on chunk versions that are no longer current (→ 409)."""

    def __init__(self, versions: dict[str, int]) -> None:
        super().__init__("stale chunk versions")
        self.versions = versions


class NothingToDo(Exception):
    """Undo/redo with an empty stack, or a decision on an edit already decided (→ 409)."""


class NoSuchEdit(Exception):
    """A decision on an edit id that does not exist (→ 404)."""


class ReviewImage:
    def __init__(self, path: Path, name: str) -> None:
        """Opens the store (and, in source mode, its verified input: ``UserError`` when it
        moved or changed)."""
        record = read_record(path)
        if record is None or record.get("status") != "complete":
            raise ValueError(f"{path} is not a finished segloop store")
        self.path, self.name, self.record = path, name, record
        self.lock = StoreLock(path).__enter__()  # one writing process per store
        self.root = zarr.open_group(path, mode="r+")
        grid = record["grid"]
        self.tile, self.shard, self.levels = grid["tile"], grid["shard"], grid["levels"]
        self.model = record["model"]
        self.classes: list[str] = self.model["classes"]
        ome = self.root["labels/segmentation"].attrs["ome"]["image-label"]
        self.colors = [c["rgba"] for c in ome["colors"]]
        self.shape = tuple(self.array(SEG, 0).shape)
        #: the image layer: the store's copy or the input read in place (``source_image``)
        self.image = StoreImage(path, record, self.shape)
        self.db = ReviewDB(path)
        self.versions = self.db.all_versions()  # (layer, chunk) → version
        # part of every ETag: tiles of another store (or a re-segmented one) never match
        # … and the generation, bumped by each re-segmentation
        params = json.dumps([record["params"], record.get("generation", 0)]).encode()
        self.tag = hashlib.sha1(params).hexdigest()[:12]
        self._locks: dict[tuple[int, int, int], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self.writer = ThreadPoolExecutor(1, thread_name_prefix=f"segloop-edit-{name}")
        self.listeners: list = []  # callables(event dict), e.g. websocket broadcasters
        self.pack: TilePack | None = None  # tiles as segmented, encoded once (set by the app)
        self.chunks = ChunkCache(self._read_seg, self._write_seg, self.db.mark_applied)
        #: confidence chunks a new model's predictions rewrote, written behind like labels
        self.confidence = ChunkCache(
            functools.partial(self._read_layer, "confidence"),
            functools.partial(self._write_layer, "confidence"),
            lambda _: None,
            budget=64 << 20,
        )
        self._seq = 0  # odd while an edit's chunks and versions are being swapped in
        self.replayed = self._replay()

    # --- arrays and locks --------------------------------------------------------------

    @functools.cache  # noqa: B019 - opening an array reads its metadata: once per image
    def array(self, layer: str, level: int) -> zarr.Array:
        return self.root[array_path(layer, level)]

    def level_shape(self, level: int) -> tuple[int, int]:
        return tuple(self.array(SEG, level).shape)

    def grid(self, level: int) -> tuple[int, int]:
        h, w = self.level_shape(level)
        return -(-h // self.tile), -(-w // self.tile)

    def shard_lock(self, level: int, cy: int, cx: int) -> threading.Lock:
        per = self.shard // self.tile
        key = (level, cy // per, cx // per)
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    @functools.cache  # noqa: B019 - one per image, lives as long as the server
    def uncertainty(self) -> np.ndarray:
        """(ny, nx) float32 per level-0 tile, stored at segment time (higher = less
        certain; see ``segloop.pipeline.uncertainty``); updated in place when a new
        model's predictions replace tiles."""
        return self.root["tiles/uncertainty"][...]

    @functools.cache  # noqa: B019 - one per image, lives as long as the server
    def tile_versions(self) -> np.ndarray:
        """(ny, nx) uint16: the model version whose predictions each level-0 tile shows
        (``tiles/model_version``), updated in place like ``uncertainty``."""
        return self.root["tiles/model_version"][...]

    def chunk_written(self, layer: str, level: int, cy: int, cx: int) -> bool:
        """Whether the shard file holding this chunk exists (else it is all fill value)."""
        if layer == "image":
            return self.image.written(level, cy, cx)
        per = self.shard // self.tile
        key = [str(cy // per), str(cx // per)]
        return (self.path / array_path(layer, level) / "c").joinpath(*key).exists()

    def version(self, layer: str, level: int, cy: int, cx: int) -> int:
        return self.versions.get((layer, ChunkKey(level, cy, cx)), 0)

    def chunk_box(self, level: int, cy: int, cx: int) -> tuple[int, int, int, int]:
        h, w = self.level_shape(level)
        t = self.tile
        return cy * t, min(h, (cy + 1) * t), cx * t, min(w, (cx + 1) * t)

    def read_chunk(self, layer: str, level: int, cy: int, cx: int) -> np.ndarray:
        """(h, w) labels / confidence, (C, h, w) image in the source dtype."""
        if layer == SEG:
            return self.chunks.get(ChunkKey(level, cy, cx))
        if layer == "confidence":
            return self.confidence.get(ChunkKey(level, cy, cx))
        box = self.chunk_box(level, cy, cx)
        try:
            if layer == "image":
                return self.image.read(level, box)
            return self.array(layer, level)[..., box[0] : box[1], box[2] : box[3]]  # no lock
        except Exception as exc:
            raise self._damaged(layer, level, cy, cx, exc) from exc

    def read_versioned(self, layer: str, level: int, cy: int, cx: int) -> tuple[int, np.ndarray]:
        """(version, chunk) of one moment, never a new chunk under an old version."""
        while True:
            seq = self._seq
            if seq % 2 == 0:
                version = self.version(layer, level, cy, cx)
                data = self.read_chunk(layer, level, cy, cx)
                if self._seq == seq:
                    return version, data
            time.sleep(0)

    def _level0(self, cy: int, cx: int) -> np.ndarray:
        return self.read_chunk(SEG, 0, cy, cx)

    def _read_seg(self, key: ChunkKey) -> np.ndarray:
        return self._read_layer(SEG, key)

    def _read_layer(self, layer: str, key: ChunkKey) -> np.ndarray:
        """The chunk caches' reader: one (h, w) uint8 chunk from zarr, under its shard's lock."""
        level, cy, cx = key
        y0, y1, x0, x1 = self.chunk_box(level, cy, cx)
        with self.shard_lock(level, cy, cx):
            try:
                return self.array(layer, level)[y0:y1, x0:x1]
            except Exception as exc:
                raise self._damaged(layer, level, cy, cx, exc) from exc

    def _damaged(self, layer: str, level: int, cy: int, cx: int, exc: Exception) -> Exception:
        """A zarr read that failed → ``DamagedChunk`` naming the shard file (``exc`` itself
        where it is not a decoding failure: a locked or full disk stays what it is)."""
        if isinstance(exc, (OSError, DamagedChunk)):
            return exc
        if layer == "image" and self.image.mode != "copy":
            return exc  # the input read in place: its reader's own error
        per = self.shard // self.tile
        key = (cy // per, cx // per)
        return damaged(
            self.path, array_path(layer, level), (0, *key) if layer == "image" else key, exc
        )

    def _write_seg(self, level: int, chunks: dict[ChunkKey, np.ndarray]) -> None:
        """The label cache's writer: chunks of one level (``_write_layer``)."""
        self._write_layer(SEG, level, chunks)

    def _write_layer(self, layer: str, level: int, chunks: dict[ChunkKey, np.ndarray]) -> None:
        """A chunk cache's writer: one layer's chunks of one level, one zarr write per shard
        (the box around the shard's chunks; the others in the box from ``read_chunk``)
        under the shard's lock."""
        per = self.shard // self.tile
        by_shard: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
        for _, cy, cx in chunks:
            by_shard[cy // per, cx // per].append((cy, cx))
        for keys in by_shard.values():
            y0, _, x0, _ = self.chunk_box(level, min(k[0] for k in keys), min(k[1] for k in keys))
            _, y1, _, x1 = self.chunk_box(level, max(k[0] for k in keys), max(k[1] for k in keys))
            region = self._assemble(level, y0, y1, x0, x1, chunks, layer)
            with self.shard_lock(level, *keys[0]):
                self.array(layer, level)[y0:y1, x0:x1] = region

    # --- applying deltas ---------------------------------------------------------------

    def _new_chunks(self, delta: Delta, layer: str = SEG) -> dict[ChunkKey, np.ndarray]:
        """The chunks a delta rewrites: its level-0 chunks with the "after" pixels set, then
        the chunks above them, level by level, where only the box over the changed pixels
        below is recomputed (2×2 mode of the new or cached chunks under it; the mean for
        the confidence, as the store's pyramid has it)."""
        down = downsample_mode if layer == SEG else downsample_mean
        new: dict[ChunkKey, np.ndarray] = {}
        boxes: dict[tuple[int, int], list[int]] = {}  # chunk → changed box (y0, y1, x0, x1)
        for text, (idx, _, after) in delta.items():
            key = ChunkKey.parse(text)
            cy, cx = key.yx
            chunk = self.read_chunk(layer, 0, cy, cx).copy()
            chunk.reshape(-1)[idx] = after
            new[key] = chunk
            ys, xs = np.divmod(idx, chunk.shape[1])
            y0, _, x0, _ = self.chunk_box(0, cy, cx)
            boxes[cy, cx] = [y0 + ys.min(), y0 + ys.max() + 1, x0 + xs.min(), x0 + xs.max() + 1]
        for level in range(1, self.levels):
            up: dict[tuple[int, int], list[int]] = {}
            for (cy, cx), (y0, y1, x0, x1) in boxes.items():  # the box one level up
                b = [y0 // 2, -(-y1 // 2), x0 // 2, -(-x1 // 2)]
                u = up.setdefault((cy // 2, cx // 2), b)
                u[:] = [min(u[0], b[0]), max(u[1], b[1]), min(u[2], b[2]), max(u[3], b[3])]
            for (cy, cx), (y0, y1, x0, x1) in up.items():
                chunk = self.read_chunk(layer, level, cy, cx).copy()
                cy0, _, cx0, _ = self.chunk_box(level, cy, cx)
                h, w = self.level_shape(level - 1)
                src = self._assemble(
                    level - 1, 2 * y0, min(h, 2 * y1), 2 * x0, min(w, 2 * x1), new, layer
                )
                chunk[y0 - cy0 : y1 - cy0, x0 - cx0 : x1 - cx0] = down(src)[: y1 - y0, : x1 - x0]
                new[ChunkKey(level, cy, cx)] = chunk
            boxes = up
        return new

    def _assemble(
        self,
        level: int,
        y0: int,
        y1: int,
        x0: int,
        x1: int,
        new: dict[ChunkKey, np.ndarray],
        layer: str = SEG,
    ) -> np.ndarray:
        """One layer's (h, w) uint8 pixels of one level's box, from the chunks in ``new``
        or else ``read_chunk`` (labels: the cache)."""
        out = np.empty((y1 - y0, x1 - x0), np.uint8)
        for cy, cx in chunk_keys((y0, y1, x0, x1), self.tile):
            a, b, c, d = self.chunk_box(level, cy, cx)
            chunk = new.get(ChunkKey(level, cy, cx))
            if chunk is None:
                chunk = self.read_chunk(layer, level, cy, cx)
            ya, yb, xa, xb = max(a, y0), min(b, y1), max(c, x0), min(d, x1)
            out[ya - y0 : yb - y0, xa - x0 : xb - x0] = chunk[ya - a : yb - a, xa - c : xb - c]
        return out

    def _replay(self) -> int:
        """Write edits committed to the database but not yet to zarr (after a crash)."""
        rows = self.db.pending_edits()
        for edit_id, blob in rows:
            self.chunks.put(edit_id, self._new_chunks(unpack(blob)))
        self.chunks.drain()
        return len(rows)

    def _commit(
        self,
        user: dict,
        op: str,
        label: int | None,
        body: dict,
        delta: Delta,
        reverts: int | None = None,
        status: str = "applied",
        undone: tuple[int, int] | None = None,
        client_id: str | None = None,
        decided: tuple[str, int] | None = None,
    ) -> tuple[int, dict[ChunkKey, int]]:
        """Commit the edit + new versions (fsync'd); then its chunks are visible at once and
        written to zarr behind the answer (marked applied when they are). ``undone``:
        (flag, edit id) to set; ``decided``: (status, edit id) of the proposal this one
        rejects. Raises ``Full`` when the disk or (for drawing edits) the user's edit
        quota has no room for it."""
        blob = pack(delta)
        free = shutil.disk_usage(self.path).free
        if free < review_db.MIN_FREE_BYTES + 2 * len(blob):
            raise Full(
                f"disk full: {free >> 20} MB free where the store is, "
                f"{review_db.MIN_FREE_BYTES >> 20} MB kept in reserve; free space and retry"
            )
        chunks = self._new_chunks(delta)  # its keys: every level's chunks to version
        versions = {key: self.version(SEG, *key) + 1 for key in chunks}
        edit_id = self.db.add_edit(
            user,
            op,
            label,
            body,
            blob,
            list(delta),
            sum(len(i) for i, _, _ in delta.values()),
            versions,
            reverts=reverts,
            status=status,
            undone=undone,
            client_id=client_id,
            decided=decided,
        )
        self._seq += 1  # readers wait: chunks and versions change together
        try:
            self.chunks.put(edit_id, chunks)
            for key, v in versions.items():
                self.versions[SEG, key] = v
        finally:
            self._seq += 1
        self.notify(
            {
                "type": "chunks",
                "layer": SEG,
                "versions": _text(versions),
                "edit_id": edit_id,
                "user": user["name"],
            }
        )
        return edit_id, versions

    # --- new predictions (continuous learning) ----------------------------------------

    def replace_tiles(
        self,
        tiles: dict[tuple[int, int], Prediction],
        version: int,
        before: Callable[[dict[tuple[int, int], Prediction]], None] | None = None,
    ) -> Future:
        """Show model ``version``'s predictions on ``tiles`` (on the writer thread); see
        ``_replace_tiles``. Resolves to the tiles replaced."""
        return self.submit(self._replace_tiles, tiles, version, before)

    def _replace_tiles(
        self,
        tiles: dict[tuple[int, int], Prediction],
        version: int,
        before: Callable[[dict[tuple[int, int], Prediction]], None] | None,
    ) -> list[tuple[int, int]]:
        """Write new labels, confidence and uncertainty of level-0 tiles (and the pyramid
        above them), bump their chunk versions and tell the listeners. Tiles a human
        edited, accepted or marked corrected, or that are lent to a reviewer right now,
        are left as they are. ``before(current)`` is given what the replaced tiles showed
        until now (to keep it: a rollback puts it back)."""
        keep = self.db.human() | self.db.leased()
        todo = {t: p for t, p in tiles.items() if t not in keep}
        if not todo:
            return []
        doubt, made_by = self.uncertainty(), self.tile_versions()
        if before is not None:
            before(
                {
                    (cy, cx): Prediction(
                        self.read_chunk(SEG, 0, cy, cx),
                        self.read_chunk("confidence", 0, cy, cx),
                        float(doubt[cy, cx]),
                        int(made_by[cy, cx]),
                    )
                    for cy, cx in todo
                }
            )
        deltas: dict[str, Delta] = {SEG: {}, "confidence": {}}
        for (cy, cx), pred in todo.items():
            for layer, new in ((SEG, pred.labels), ("confidence", pred.confidence)):
                old = self.read_chunk(layer, 0, cy, cx).reshape(-1)
                idx = np.flatnonzero(old != new.reshape(-1))
                if idx.size:
                    deltas[layer][ChunkKey(0, cy, cx).short] = (idx, old[idx], new.reshape(-1)[idx])
        seg = self._new_chunks(deltas[SEG])
        conf = self._new_chunks(deltas["confidence"], "confidence")
        versions = {
            (layer, key): self.version(layer, *key) + 1
            for layer, chunks in ((SEG, seg), ("confidence", conf))
            for key in chunks
        }
        self.db.set_versions(versions)
        self._seq += 1  # readers wait: chunks and versions change together
        try:
            self.chunks.put(None, seg)
            self.confidence.put(None, conf)
            self.versions.update(versions)
        finally:
            self._seq += 1
        for (cy, cx), pred in todo.items():
            doubt[cy, cx], made_by[cy, cx] = pred.uncertainty, version
        per = self.shard // self.tile  # the per-tile arrays have one chunk per shard
        for sy, sx in {(cy // per, cx // per) for cy, cx in todo}:
            block = (slice(sy * per, (sy + 1) * per), slice(sx * per, (sx + 1) * per))
            self.root["tiles/uncertainty"][block] = doubt[block]
            self.root["tiles/model_version"][block] = made_by[block]
        for layer in (SEG, "confidence"):
            changed = {k: v for (lr, k), v in versions.items() if lr == layer}
            if changed:
                self.notify({"type": "chunks", "layer": layer, "versions": _text(changed)})
        return sorted(todo)

    def notify(self, event: dict[str, Any]) -> None:
        """Tell every listener (the live-update WebSockets) of ``event``."""
        for listener in list(self.listeners):
            listener(event)

    # --- operations (run on the writer thread) -----------------------------------------

    def submit(self, fn, *args) -> Future:
        """Run ``fn(*args)`` on this image's writer thread (every change to the image and
        its database goes there, in one total order)."""
        return self.writer.submit(fn, *args)

    def apply(self, edit: Edit, user: dict) -> Future:
        return self.submit(self._apply, edit, user)

    def _apply(self, edit: Edit, user: dict) -> dict[str, Any]:
        validate(edit, self.shape, len(self.classes))
        if edit.client_id is not None:  # a re-send of an edit already made: its result
            row = self.db.edit_by_client_id(edit.client_id)
            if row is not None and row["user_id"] != user["id"]:
                raise BadEdit("client_id is taken by another user's edit; use a fresh one")
            if row is not None:
                keys = map(ChunkKey.parse, row["chunks"])
                versions = {k.short: self.version(SEG, *k) for k in keys}
                return {"edit_id": row["id"], "versions": versions, "status": row["status"],
                        "duplicate": True, "changed_px": 0}  # fmt: skip
        if edit.base:
            current = {k: self.version(SEG, *ChunkKey.parse(k)) for k in edit.base}
            if current != edit.base:
                raise Conflict(current)
        label = 0 if edit.op == "erase" else edit.label
        if edit.op == "assist":
            keys, masks = assist.rasterise(self, edit)
        else:
            keys, masks = rasterise(edit, self.shape, self.tile, self._level0)
        delta: Delta = {}
        for (cy, cx), mask in zip(keys, masks, strict=True):
            old = self.read_chunk(SEG, 0, cy, cx)
            h, w = old.shape
            flat = old.reshape(-1)
            paint = mask[:h, :w].reshape(-1).view(bool) & (flat != label)
            if edit.only is not None:  # preserve the other classes
                paint &= flat == edit.only
            idx = np.flatnonzero(paint)
            if idx.size:
                delta[ChunkKey(0, cy, cx).short] = (
                    idx,
                    flat[idx],
                    np.full(idx.size, label, np.uint8),
                )
        status = "proposed" if user["role"] == "annotator" else "applied"
        if not delta:
            return {"edit_id": None, "versions": {}, "changed_px": 0}
        body = msgspec_to_dict(edit)
        edit_id, versions = self._commit(
            user, edit.op, edit.label, body, delta, status=status, client_id=edit.client_id
        )
        return {
            "edit_id": edit_id,
            "versions": _level0(versions),
            "pyramid": _text(versions),
            "status": status,
            "changed_px": int(sum(i.size for i, _, _ in delta.values())),
        }

    def undo(self, user: dict) -> Future:
        return self.submit(self._undo_redo, user, "undo")

    def redo(self, user: dict) -> Future:
        return self.submit(self._undo_redo, user, "redo")

    def _undo_redo(self, user: dict, op: str) -> dict[str, Any]:
        """Undo the user's newest drawing edit (or redo) not undone yet, or redo the newest
        undo if no drawing edit came after it. An annotator's undo and redo are proposals,
        like the edits they revert (a reviewer decides them)."""
        target = self.db.revert_target(user["id"], op)
        if target is None:
            raise NothingToDo(f"nothing to {op}")
        status = "proposed" if user["role"] == "annotator" else "applied"
        return self._revert(target, user, op, status)

    def decide(self, edit_id: int, decision: str, user: dict) -> Future:
        """A reviewer approves or rejects (reverts) a proposed edit, once: a second
        decision on it raises ``NothingToDo`` (the writer thread orders the two)."""
        return self.submit(self._decide, edit_id, decision, user)

    def _decide(self, edit_id: int, decision: str, user: dict) -> dict[str, Any]:
        current = self.db.edit_status(edit_id)
        if current is None:
            raise NoSuchEdit(f"no edit {edit_id}")
        if current != "proposed":
            raise NothingToDo(f"edit {edit_id} is {current}, not proposed")
        status = "approved" if decision == "approve" else "rejected"
        result: dict[str, Any] = {"edit_id": edit_id, "status": status}
        if decision == "reject":
            result["revert"] = self._revert(edit_id, user, "reject", decided=status)
        else:
            self.db.set_status(edit_id, status)
        return result

    def _revert(
        self, target: int, user: dict, op: str, status: str = "applied", decided: str | None = None
    ) -> dict[str, Any]:
        """Put back edit ``target``'s "before" values where its "after" values still stand;
        ``decided``: the status to give ``target`` in the same transaction."""
        _, blob = self.db.edit_delta(target)
        delta = {}
        for key, (idx, before, after) in unpack(blob).items():
            now = self.read_chunk(SEG, *ChunkKey.parse(key)).reshape(-1)[idx]
            still = now == after  # pixels nobody changed since: revert those only
            if still.any():
                delta[key] = (idx[still], after[still], before[still])
        if not delta:
            self.db.mark_reverted(target, decided)
            return {"edit_id": None, "reverts": target, "versions": {}}
        edit_id, versions = self._commit(
            user,
            op,
            None,
            {"reverts": target},
            delta,
            reverts=target,
            status=status,
            undone=(1, target),
            decided=None if decided is None else (decided, target),
        )
        return {
            "edit_id": edit_id,
            "reverts": target,
            "status": status,
            "versions": _level0(versions),
            "pyramid": _text(versions),
        }

    def close(self) -> None:
        if self.pack is not None:
            self.pack.close()
        self.writer.shutdown(wait=True)
        self.chunks.close()
        self.confidence.close()
        self.db.close()
        self.image.close()
        self.lock.__exit__()


def _level0(versions: dict[ChunkKey, int]) -> dict[str, int]:
    """{"cy/cx": v} of the level-0 chunks (what clients send as ``base``)."""
    return {k.short: v for k, v in versions.items() if k.level == 0}


def _text(versions: dict[ChunkKey, int]) -> dict[str, int]:
    """{"level/cy/cx": v}: the versions as the HTTP API and live updates give them."""
    return {str(k): v for k, v in versions.items()}


def msgspec_to_dict(edit: Edit) -> dict[str, Any]:
    return msgspec.to_builtins(edit)

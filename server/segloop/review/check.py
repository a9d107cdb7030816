"""``segloop check STORE``: the full integrity check of a store.

``PRAGMA integrity_check`` of ``review.sqlite``; every zarr array's metadata; every stored
chunk (shard) decoded, which verifies its crc32c checksums where the store has them (new
stores: inner chunks and shard indexes; older ones: shard indexes only). One line per
problem; notes (such as chunks without checksums) are not problems.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ShardingCodec

from segloop.errors import UserError

#: integrity_check rows reported one by one before the rest are counted
_MAX_DB_LINES = 10
_EMPTY = np.uint64(2**64 - 1)  # a shard index entry of a chunk never written


class DamagedChunk(Exception):
    """A stored chunk that does not decode or fails its checksum; names the shard file."""


@dataclass
class Report:
    """What ``check_store`` found: problems (exit 1), notes, and what it read."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    arrays: int = 0
    shards: int = 0


def damaged(store: Path, array: str, key: tuple[int, ...], exc: BaseException) -> DamagedChunk:
    """The error a reader raises for a shard that does not decode (one clear line)."""
    where = f"{array}/c/{'/'.join(map(str, key))}"
    return DamagedChunk(
        f"{where} is damaged or truncated ({_reason(exc)}); run `segloop check {store}`"
    )


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if "checksum do not match" in text:
        return "fails its crc32c checksum"
    return text[:200]


def check_store(store: Path) -> Report:
    """Check everything in ``store``; ``UserError`` if it is not a segloop store at all."""
    from segloop.io.ome_zarr import own_path, read_record
    from segloop.review.db import DB_NAME

    record = read_record(store) if store.is_dir() else None
    if record is None:
        raise UserError(f"{store} is not a segloop store (no segloop.json)")
    report = Report()
    if record.get("status") != "complete":
        report.problems.append(f"{store}: not finished (status {record.get('status')!r})")
    _check_db(own_path(store, DB_NAME), report)
    for rel in _expected_arrays(record):
        if not (store / rel / "zarr.json").is_file():
            report.problems.append(f"{rel}: missing (no zarr.json)")
    for meta in sorted(store.rglob("zarr.json")):
        rel = "" if meta.parent == store else meta.parent.relative_to(store).as_posix()
        if "/c/" in f"/{rel}/":
            continue  # a file inside a chunk folder is not metadata of ours
        _check_node(store, rel, meta, report)
    return report


def _expected_arrays(record: dict) -> list[str]:
    from segloop.io.ome_zarr import TILE_ARRAYS, array_path

    layers = ["segmentation", "confidence"]
    if record.get("image", {}).get("mode", "copy") == "copy":
        layers.insert(0, "image")
    levels = int(record["grid"]["levels"])
    out = [array_path(layer, k) for layer in layers for k in range(levels)]
    return out + [f"tiles/{name}" for name in TILE_ARRAYS]


def _check_db(path: Path, report: Report) -> None:
    if not path.exists():
        return
    from segloop.review.db import integrity_check

    try:
        rows = integrity_check(path)
    except sqlite3.DatabaseError as exc:
        report.problems.append(f"review.sqlite: damaged ({exc})")
        return
    if rows == ["ok"]:
        return
    for row in rows[:_MAX_DB_LINES]:
        report.problems.append(f"review.sqlite: {' '.join(row.replace('*', '').split())}")
    if len(rows) > _MAX_DB_LINES:
        report.problems.append(f"review.sqlite: {len(rows) - _MAX_DB_LINES} more problems")


def _check_node(store: Path, rel: str, meta: Path, report: Report) -> None:
    name = rel or "(root)"
    try:
        node = json.loads(meta.read_bytes())
        if node.get("node_type") != "array":
            zarr.open_group(store, path=rel, mode="r")
            return
        arr = zarr.open_array(store, path=rel, mode="r")
    except Exception as exc:  # any damage: one line
        report.problems.append(f"{name}/zarr.json: unreadable metadata ({_reason(exc)})")
        return
    report.arrays += 1
    sharding = arr.metadata.codecs[0] if arr.metadata.codecs else None
    sharding = sharding if isinstance(sharding, ShardingCodec) else None
    codecs = sharding.codecs if sharding else arr.metadata.codecs
    if not any(isinstance(c, Crc32cCodec) for c in codecs):
        report.notes.append(
            f"{rel}: chunks carry no checksum (a store made before crc32c); only decoding "
            "was checked"
        )
    grid = arr.metadata.chunk_grid.chunk_shape  # the shard shape where sharded
    cgrid = [-(-n // c) for n, c in zip(arr.shape, grid, strict=True)]
    folder = store / rel / "c"
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
    for path in files:
        parts = path.relative_to(folder).parts
        try:
            key = tuple(int(p) for p in parts)
        except ValueError:
            key = ()
        if len(key) != len(grid) or any(not 0 <= k < n for k, n in zip(key, cgrid, strict=True)):
            report.problems.append(f"{rel}/c/{'/'.join(parts)}: not a chunk of this array")
            continue
        report.shards += 1
        box = tuple(
            slice(k * c, min(n, (k + 1) * c)) for k, c, n in zip(key, grid, arr.shape, strict=True)
        )
        try:
            arr[box]
        except Exception as exc:  # every decoding failure is a finding
            why = _shard_reason(arr, sharding, path, box) if sharding else _reason(exc)
            report.problems.append(f"{rel}/c/{'/'.join(parts)}: {why or _reason(exc)}")


def _shard_reason(arr: zarr.Array, sharding: ShardingCodec, path: Path, box) -> str | None:
    """Why a shard file does not decode: truncated, a bad index, or which inner chunks fail
    (None where its layout is not the one this reads: index at the end, crc32c)."""
    inner = sharding.chunk_shape
    per = [-(-(s.stop - s.start) // c) for s, c in zip(box, inner, strict=True)]
    full = [-(-c // i) for c, i in zip(arr.metadata.chunk_grid.chunk_shape, inner, strict=True)]
    n = int(np.prod(full))
    index_bytes = 16 * n + 4
    raw = path.read_bytes()
    if sharding.index_location.value != "end" or not any(
        isinstance(c, Crc32cCodec) for c in sharding.index_codecs
    ):
        return None
    if len(raw) < index_bytes:
        return f"truncated ({len(raw)} bytes, smaller than its {index_bytes}-byte shard index)"
    index = raw[-index_bytes:]
    if google_crc32c.value(index[:-4]) != int.from_bytes(index[-4:], "little"):
        return "truncated or overwritten: its shard index fails its crc32c checksum"
    entries = np.frombuffer(index[:-4], "<u8").reshape(-1, 2)
    written = entries[entries[:, 0] != _EMPTY]
    if len(written) and int((written[:, 0] + written[:, 1]).max()) > len(raw) - index_bytes:
        return "truncated: its index points past the end of the file"
    bad = []
    for flat in range(int(np.prod(per))):
        pos = np.unravel_index(flat, per)
        sub = tuple(
            slice(s.start + p * c, min(s.stop, s.start + (p + 1) * c))
            for s, p, c in zip(box, pos, inner, strict=True)
        )
        try:
            arr[sub]
        except Exception as exc:  # every decoding failure is a finding
            bad.append(("/".join(str(int(p)) for p in pos), _reason(exc)))
    if not bad:
        return None
    first, why = bad[0]
    return f"{len(bad)} of {int(np.prod(per))} chunks do not decode (first {first}: {why})"

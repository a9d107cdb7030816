"""`segloop check STORE` on real stores, and a damaged shard in a running server: a clear
JSON error naming the file, never a bare 500."""

from __future__ import annotations

import math
import shutil
import struct
from pathlib import Path

import pytest
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ShardingCodec

from tests.conftest import TILE, assert_user_error, run_cli
from tests.test_review import Server, add_user, call, grow_review_db, wait_applied

SEG0 = "labels/segmentation/0"


@pytest.fixture
def store(base_store, tmp_path) -> Path:
    out = tmp_path / "slide.zarr"
    shutil.copytree(base_store, out)
    return out


def _shard(store: Path, array: str = SEG0, key: str = "0/0") -> Path:
    path = store / array / "c" / key
    assert path.is_file(), path
    return path


def _flip_inner_byte(store: Path, array: str, key: str) -> None:
    """Flip one byte inside shard ``key``'s first inner chunk, (0, 0) or (0, 0, 0): its
    offset from the shard index at the file's end (inner chunks lie in any order, as the
    writer finished them; the index is (offset, nbytes) uint64 pairs in C order + crc32c)."""
    meta = zarr.open_array(store / array, mode="r").metadata
    inner = meta.codecs[0].chunk_shape
    n = math.prod(o // i for o, i in zip(meta.chunk_grid.chunk_shape, inner, strict=True))
    path = _shard(store, array, key)
    raw = bytearray(path.read_bytes())
    offset, nbytes = struct.unpack_from("<QQ", raw, len(raw) - 4 - 16 * n)
    assert nbytes != 2**64 - 1, f"{path}: its first inner chunk is not stored"
    raw[offset + nbytes // 2] ^= 0xFF
    path.write_bytes(raw)


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def test_new_stores_carry_crc32c_and_check_clean(store):
    for name in (SEG0, "confidence/0", "tiles/uncertainty"):
        arr = zarr.open_array(store / name, mode="r")
        codecs = arr.metadata.codecs
        if isinstance(codecs[0], ShardingCodec):
            codecs = codecs[0].codecs
        assert isinstance(codecs[-1], Crc32cCodec), (name, codecs)
    add_user(store, "a", "admin")  # review.sqlite exists and is checked too
    proc = run_cli("check", store)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert "intact" in proc.stderr and "no checksum" not in proc.stderr
    assert "Traceback" not in proc.stderr


def test_check_names_every_problem(store):
    add_user(store, "a", "admin")
    _flip_inner_byte(store, SEG0, "0/0")
    _truncate(_shard(store, "confidence/0", "0/0"))
    meta = store / "confidence/1/zarr.json"
    meta.write_text(meta.read_text()[:40])
    grow_review_db(store)
    raw = bytearray((store / "segloop" / "review.sqlite").read_bytes())
    raw[3 * 4096 : 4 * 4096] = b"\xa5" * 4096
    (store / "segloop" / "review.sqlite").write_bytes(raw)

    proc = run_cli("check", store)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    by_what = {
        "seg": [ln for ln in lines if f"{SEG0}/c/0/0" in ln],
        "conf": [ln for ln in lines if "confidence/0/c/0/0" in ln],
        "meta": [ln for ln in lines if "confidence/1/zarr.json" in ln],
        "db": [ln for ln in lines if "review.sqlite" in ln],
    }
    assert len(by_what["seg"]) == 1 and "crc32c" in by_what["seg"][0], lines
    assert len(by_what["conf"]) == 1 and "truncated" in by_what["conf"][0], lines
    assert len(by_what["meta"]) == 1 and "unreadable" in by_what["meta"][0], lines
    assert by_what["db"], lines
    assert sum(map(len, by_what.values())) == len(lines), lines  # nothing else flagged
    assert f"{len(lines)} problems" in proc.stderr


def test_old_store_without_checksums_stays_readable(store):
    """An array written before crc32c (rewritten here with the old codecs): the server
    reads it, check passes and says its chunks carry no checksum."""
    root = zarr.open_group(store, mode="r+")
    old = root[SEG0]
    data, attrs = old[...], dict(old.attrs)
    sharding = old.metadata.codecs[0]
    arr = root.create_array(
        SEG0,
        shape=old.shape,
        dtype=old.dtype,
        chunks=sharding.chunk_shape,
        shards=old.metadata.chunk_grid.chunk_shape,
        compressors=BloscCodec(cname="zstd", clevel=1, shuffle="noshuffle"),
        fill_value=0,
        dimension_names=old.metadata.dimension_names,
        overwrite=True,
    )
    arr[...] = data
    arr.attrs.update(attrs)
    assert not any(isinstance(c, Crc32cCodec) for c in arr.metadata.codecs[0].codecs)
    proc = run_cli("check", store)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    notes = [ln for ln in proc.stderr.splitlines() if "no checksum" in ln]
    assert len(notes) == 1 and SEG0 in notes[0], proc.stderr

    env = {"tokens": {"reviewer": add_user(store, "reviewer", "reviewer")}}
    env["server"] = server = Server(store, no_tile_pack=True)
    try:
        r = call(env, "GET", "/api/images/slide/tiles/segmentation/0/0/0")
        assert r.status_code == 200, r.text
        stroke = {"op": "brush", "points": [[30, 30]], "label": 2, "radius": 3}
        assert call(env, "POST", "/api/images/slide/edits", json=stroke).status_code == 200
    finally:
        server.stop()


def test_check_of_a_non_store_is_a_user_error(tmp_path):
    assert_user_error(run_cli("check", tmp_path), "not a segloop store")


def test_truncated_segmentation_shard_is_a_clear_json_error(store):
    """Tiles and edits on a truncated shard: JSON naming the shard file and `segloop
    check`; the store's other shard files are served as before."""
    env = {"tokens": {"reviewer": add_user(store, "reviewer", "reviewer")}}
    _truncate(_shard(store, SEG0, "0/0"))
    env["server"] = server = Server(store, no_tile_pack=True)
    try:
        tile = call(env, "GET", "/api/images/slide/tiles/segmentation/0/0/0")
        stroke = {"op": "brush", "points": [[20, 20]], "label": 2, "radius": 3}
        edit = call(env, "POST", "/api/images/slide/edits", json=stroke)
        for r in (tile, edit):
            assert r.status_code == 500 and r.headers["Content-Type"].startswith(
                "application/json"
            ), r.text
            body = r.json()
            assert f"{SEG0}/c/0/0" in body["error"] and "segloop check" in body["error"], body
            assert body["damaged"] is True
        for other in ("segmentation/1/0/0", "confidence/0/0/0"):  # other shard files
            assert call(env, "GET", f"/api/images/slide/tiles/{other}").status_code == 200
        assert call(env, "GET", "/api/health").status_code == 200
    finally:
        server.stop()
    wait_applied(store)
    proc = run_cli("check", store)
    assert proc.returncode == 1
    assert any(f"{SEG0}/c/0/0" in ln and "truncated" in ln for ln in proc.stdout.splitlines())


def test_damaged_image_copy_shard_is_caught_not_served(slide, tmp_path):
    """A store with a copy of the image: one flipped byte in an image shard fails its
    checksum, so the tile is a JSON error naming the file (it was served silently)."""
    store = tmp_path / "copy.zarr"
    proc = run_cli("segment", slide[0], "-o", store, "--tile", str(TILE), "--copy-image", "--quiet")
    assert proc.returncode == 0, proc.stderr
    _flip_inner_byte(store, "0", "0/0/0")
    proc = run_cli("check", store)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and "0/c/0/0/0" in lines[0] and "crc32c" in lines[0], lines
    env = {"tokens": {"reviewer": add_user(store, "reviewer", "reviewer")}}
    env["server"] = server = Server(store, no_tile_pack=True)
    try:
        r = call(env, "GET", "/api/images/copy/tiles/image/0/0/0", headers={"Accept": "image/png"})
        assert r.status_code == 500 and "0/c/0/0/0" in r.json()["error"], r.text
        assert call(env, "GET", "/api/images/copy/tiles/segmentation/0/0/0").status_code == 200
    finally:
        server.stop()

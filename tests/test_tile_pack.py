"""segloop.review.tile_pack: built in the background, paused while busy, kept, rebuilt;
lives in the cache folder."""

from __future__ import annotations

import time
from pathlib import Path

from segloop.review.tile_pack import TilePack, pack_path

TILES = [(0, 0, 0), (0, 0, 1), (1, 0, 0)]


def render(level: int, ty: int, tx: int) -> dict[tuple[str, str], bytes]:
    return {("image", "webp"): f"{level}/{ty}/{tx}".encode()}


def wait_done(pack: TilePack, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while pack.progress["tiles"] < pack.progress["of"]:
        assert time.monotonic() < deadline, pack.progress
        time.sleep(0.01)


def test_builds_when_not_busy_and_keeps_what_it_built(tmp_path):
    busy = [True]
    path = tmp_path / "pack.sqlite"
    pack = TilePack(path, "tag1", TILES, formats=1)
    pack.start(render, lambda: busy[0])
    time.sleep(0.2)
    assert pack.progress == {"tiles": 0, "of": 3}  # waits while tiles are rendered on demand
    busy[0] = False
    wait_done(pack)
    assert pack.get("image", 0, 0, 1, "webp") == b"0/0/1"
    assert pack.get("image", 0, 0, 1, "jpeg") is None
    pack.close()
    again = TilePack(path, "tag1", TILES, formats=1)  # a restart: nothing to build
    assert again.progress == {"tiles": 3, "of": 3} and again.get("image", 1, 0, 0, "webp")
    again.close()
    other = TilePack(path, "tag2", TILES, formats=1)  # other store parameters: emptied
    assert other.progress == {"tiles": 0, "of": 3}
    assert other.get("image", 1, 0, 0, "webp") is None
    other.close()


def test_positions_may_hold_different_formats(tmp_path):
    """A position whose image passes through from the source holds fewer rows; it counts
    as done when it holds what ``formats(position)`` says."""
    path = tmp_path / "pack.sqlite"
    pack = TilePack(path, "t", TILES, formats=lambda key: 1 if key[0] == 0 else 2)

    def two_at_level_1(level: int, ty: int, tx: int) -> dict[tuple[str, str], bytes]:
        out = {("segmentation", "png"): b"labels"}
        if level == 1:
            out["image", "webp"] = b"image"
        return out

    pack.start(two_at_level_1)
    wait_done(pack)
    pack.close()
    again = TilePack(path, "t", TILES, formats=lambda key: 1 if key[0] == 0 else 2)
    assert again.progress == {"tiles": 3, "of": 3}
    again.close()


def test_pack_path_is_in_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGLOOP_CACHE", str(tmp_path / "cache"))
    a, b = pack_path(Path("x/slide.zarr")), pack_path(Path("y/slide.zarr"))
    assert a.parent == tmp_path / "cache" / "tile-packs" and a.name.startswith("slide-")
    assert a != b  # one pack per store, by its resolved path

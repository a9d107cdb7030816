"""segloop.review.tile_pack: built in the background, paused while busy, kept, rebuilt."""

from __future__ import annotations

import time

from segloop.review.tile_pack import TilePack

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
    pack = TilePack(tmp_path, "tag1", TILES, formats=1)
    pack.start(render, lambda: busy[0])
    time.sleep(0.2)
    assert pack.progress == {"tiles": 0, "of": 3}  # waits while tiles are rendered on demand
    busy[0] = False
    wait_done(pack)
    assert pack.get("image", 0, 0, 1, "webp") == b"0/0/1"
    assert pack.get("image", 0, 0, 1, "jpeg") is None
    pack.close()
    again = TilePack(tmp_path, "tag1", TILES, formats=1)  # a restart: nothing to build
    assert again.progress == {"tiles": 3, "of": 3} and again.get("image", 1, 0, 0, "webp")
    again.close()
    other = TilePack(tmp_path, "tag2", TILES, formats=1)  # other store parameters: emptied
    assert other.progress == {"tiles": 0, "of": 3}
    assert other.get("image", 1, 0, 0, "webp") is None
    other.close()

"""The image layer served from every kind of store: the store's copy, the input read in
place (JPEG tiles passed through, zlib tiles re-encoded, levels the input lacks computed);
a moved or changed input is refused; ``segloop serve --image`` relocates it."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import requests
import tifffile
import zarr
from PIL import Image

from segloop.synth import write_ome_tiff
from segloop.triton.server import free_port
from tests.conftest import SLIDE_SEED, TILE, assert_user_error, run_cli
from tests.test_review import Server, add_user

#: what Chromium sends for an <img>
BROWSER = "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"


@pytest.fixture(scope="module")
def jpeg_stores(tmp_path_factory) -> dict[str, Path]:
    """A 570×650 JPEG OME-TIFF in 256² tiles (levels 570×650 and 285×325; store level 2,
    143×163, is not in it) and two stores of it: default (read in place) and
    ``--copy-image``; the same pixels as an OME-Zarr 0.5 input (128² chunks, the same two
    levels) and its store (read in place)."""
    d = tmp_path_factory.mktemp("image-layer")
    src = d / "jpeg.ome.tif"
    write_ome_tiff(src, 570, 650, seed=SLIDE_SEED, tile=TILE)
    out = {"input": src, "zarr-input": d / "input.ome.zarr"}
    g = zarr.open_group(out["zarr-input"], mode="w", zarr_format=3)
    datasets = []
    for k, level in enumerate(own_levels(src)):
        g.create_array(str(k), data=np.moveaxis(level, -1, 0), chunks=(3, 128, 128))
        scale = [1.0, 2.0**k, 2.0**k]
        datasets.append(
            {"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": scale}]}
        )
    axes = [{"name": "c", "type": "channel"}, {"name": "y", "type": "space"}]
    axes.append({"name": "x", "type": "space"})
    g.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": datasets}]}
    for name, source, flags in (
        ("source", src, ()),
        ("copy", src, ("--copy-image",)),
        ("zarr", out["zarr-input"], ()),
    ):
        out[name] = d / f"{name}.zarr"
        proc = run_cli("segment", source, "-o", out[name], "--tile", str(TILE), "--quiet", *flags)
        assert proc.returncode == 0, proc.stderr
    return out


def own_levels(source: Path) -> list[np.ndarray]:
    """(h, w, C) of every level the input itself holds (tifffile / zarr, not segloop)."""
    if source.is_dir():
        g = zarr.open_group(source, mode="r")
        return [np.moveaxis(g[str(k)][...], 0, -1) for k in range(len(list(g.array_keys())))]
    with tifffile.TiffFile(source) as tif:
        return [lv.asarray() for lv in tif.series[0].levels]


def down(a: np.ndarray) -> np.ndarray:
    """(h, w, C) uint8 → 2×2 mean rounded half up, odd edge replicated (the copy's rule,
    written independently of the kernel)."""
    h, w = a.shape[:2]
    p = np.pad(a, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge").astype(np.uint32)
    s = p[0::2, 0::2] + p[1::2, 0::2] + p[0::2, 1::2] + p[1::2, 1::2]
    return ((s + 2) // 4).astype(a.dtype)


def expected(source: Path, mode: str, levels: int) -> list[tuple[np.ndarray, bool]]:
    """(pixels (h, w, C), one of the input's own levels) of every store level: a copy is
    the 2×2 mean pyramid of level 0; a store reading in place has the input's own levels,
    and the mean of the level below where the input has no level of that shape."""
    own = own_levels(source)
    shapes = {a.shape[:2]: a for a in own}
    out = [(own[0], True)]
    for k in range(1, levels):
        h, w = own[0].shape[:2]
        shape = (-(-h // 2**k), -(-w // 2**k))
        if mode == "source" and shape in shapes:
            out.append((shapes[shape], True))
        else:
            out.append((down(out[-1][0]), False))
    return out


def jpeg_tile_bytes(source: Path, level: int, ty: int, tx: int) -> bytes | None:
    """The file's own JPEG stream of a 256² tile of ``level`` (tifffile writes whole
    JFIF streams, no JPEGTables)."""
    with tifffile.TiffFile(source) as tif:
        page = tif.series[0].levels[level].pages[0]
        assert page.compression == 7 and page.tilewidth == TILE and page.jpegtables is None
        i = ty * -(-page.imagewidth // TILE) + tx
        tif.filehandle.seek(page.dataoffsets[i])
        return tif.filehandle.read(page.databytecounts[i])


def decode(body: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(body)) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("kind", ["jpeg-source", "jpeg-copy", "zlib-source", "zarr-source"])
def test_image_tiles_are_the_input_at_every_level(kind, jpeg_stores, base_store, slide, tmp_path):
    """Every tile of every level: lossless PNG equals the expected pixels exactly; what a
    browser gets is the input's JPEG bytes where they pass through (decoding to the input's
    tile), else WebP close to the same pixels."""
    if kind == "zlib-source":
        original, source = base_store, slide[0]
    elif kind == "zarr-source":
        original, source = jpeg_stores["zarr"], jpeg_stores["zarr-input"]
    else:
        original, source = jpeg_stores[kind.split("-")[1]], jpeg_stores["input"]
    store = tmp_path / "slide.zarr"
    shutil.copytree(original, store)
    record = json.loads((store / "segloop" / "segloop.json").read_text())
    mode = record["image"]["mode"]
    assert mode == ("copy" if kind == "jpeg-copy" else "source")
    assert (store / "0").exists() == (mode == "copy")
    token = add_user(store, "viewer", "viewer")
    auth = {"Authorization": f"Bearer {token}"}
    server = Server(store, no_tile_pack=True)
    try:
        meta = requests.get(f"{server.base}/api/images/{store.stem}", headers=auth, timeout=30)
        meta = meta.json()
        assert meta["image"] == mode and meta["channels"] == 3
        want = expected(source, mode, meta["levels"])
        passed = 0
        for level, (h, w) in enumerate(meta["level_shapes"]):
            pixels, own = want[level]
            assert pixels.shape[:2] == (h, w)
            for ty in range(-(-h // TILE)):
                for tx in range(-(-w // TILE)):
                    url = f"{server.base}/api/images/{store.stem}/tiles/image/{level}/{ty}/{tx}"
                    y0, x0 = ty * TILE, tx * TILE
                    tile = pixels[y0 : y0 + TILE, x0 : x0 + TILE]
                    png = requests.get(url, headers={**auth, "Accept": "image/png"}, timeout=30)
                    assert png.headers["Content-Type"] == "image/png"
                    np.testing.assert_array_equal(decode(png.content), tile)
                    r = requests.get(url, headers={**auth, "Accept": BROWSER}, timeout=30)
                    assert r.status_code == 200
                    full = tile.shape[:2] == (TILE, TILE)
                    if kind == "jpeg-source" and own and full:  # the input's own bytes
                        passed += 1
                        assert r.headers["Content-Type"] == "image/jpeg"
                        assert r.content == jpeg_tile_bytes(source, level, ty, tx)
                        np.testing.assert_array_equal(decode(r.content), tile)
                    else:
                        assert r.headers["Content-Type"] == "image/webp"
                        got = decode(r.content).astype(np.int16)
                        assert got.shape == tile.shape
                        assert np.abs(got - tile).mean() < 8  # lossy (WebP q85, 4:2:0)
        assert passed == (5 if kind == "jpeg-source" else 0)  # 4 at level 0, 1 at level 1
    finally:
        server.stop()


def serve_refused(store: Path, *args: str, words: tuple[str, ...]) -> None:
    """``segloop serve`` exits at once with one line naming ``words``."""
    proc = run_cli("serve", store, "--port", str(free_port()), *args, timeout=120)
    assert_user_error(proc, *words)


def test_moved_or_changed_input_is_refused_and_image_relocates(jpeg_stores, slide, tmp_path):
    store = tmp_path / "slide.zarr"
    shutil.copytree(jpeg_stores["source"], store)
    token = add_user(store, "viewer", "viewer")
    moved = tmp_path / "elsewhere" / "renamed.ome.tif"
    moved.parent.mkdir()
    shutil.copy2(jpeg_stores["input"], moved)

    serve_refused(store, "--image", str(slide[0]), words=("--image", "not the image"))
    serve_refused(store, "--image", str(moved), "--image", str(moved), words=("one per store",))
    server = Server(store, args=("--image", moved))  # relocated: the record names it
    try:
        record = json.loads((store / "segloop" / "segloop.json").read_text())
        assert record["image"]["path"] == str(moved.resolve())
        r = requests.get(
            f"{server.base}/api/images/slide/tiles/image/0/1/1",
            headers={"Authorization": f"Bearer {token}", "Accept": BROWSER},
            timeout=30,
        )
        assert r.content == jpeg_tile_bytes(moved, 0, 1, 1)
    finally:
        server.stop()
    Server(store).stop()  # the relocation stays: no --image needed any more

    gone = moved.with_name("gone.ome.tif")
    moved.rename(gone)
    serve_refused(store, words=("renamed.ome.tif", "cannot be opened", "segloop serve --image"))
    data = bytearray(gone.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte of tile data, the size unchanged
    moved.write_bytes(bytes(data))
    serve_refused(store, words=("not the image", "segloop serve --image"))
    serve_refused(store, "--image", str(moved), words=("not the image",))
    proc = run_cli("export-corrections", store, tmp_path / "out")  # the same check
    assert proc.returncode == 2 and "--image" in proc.stderr, proc.stderr


def test_image_option_on_a_store_with_its_own_copy_is_refused(jpeg_stores, tmp_path):
    store = tmp_path / "copy.zarr"
    shutil.copytree(jpeg_stores["copy"], store)
    serve_refused(store, "--image", str(jpeg_stores["input"]), words=("own copy",))

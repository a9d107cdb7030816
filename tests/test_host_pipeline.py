"""The host pipeline: windows decoupled from chunks, decode once, writers on every core.

Every variant must give the same bits: the window only changes how much halo the model
computes, the shard and the writer count only how the store is cut and written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from segloop.io.formats import open_image
from segloop.io.ome_zarr import read_record
from segloop.pipeline.read import BlockCache, plan_windows
from segloop.synth import write_ome_tiff
from segloop.tiling import TileGrid
from tests.conftest import read_store, run_cli

VARIANTS = {
    # name: extra CLI args (tile 256 everywhere: the store's chunk grid is fixed)
    "window-256": ["--window", "256", "--batch", "4"],
    "window-shard": [],
    "window-512-shard-1024": ["--window", "512", "--shard", "1024"],
    "shard-512-writers-1": ["--shard", "512", "--writers", "1"],
    "shard-256-writers-3": ["--shard", "256", "--writers", "3", "--batch", "1"],
    "writer-processes": ["--shard", "256", "--writers", "2", "--writer-processes"],
}


@pytest.fixture(scope="module")
def variants(slide, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("variants")
    out = {}
    for name, extra in VARIANTS.items():
        store = d / f"{name}.zarr"
        proc = run_cli("segment", slide[0], "-o", store, "--tile", "256", "--json", *extra)
        assert proc.returncode == 0, proc.stderr
        out[name] = store
    return out


def test_same_bits_for_every_window_shard_and_writer_count(variants):
    """Labels, confidence and their pyramids are bit-identical; the chunk grid is the same,
    so every array compares whole."""
    ref = {k: v for k, v in read_store(variants["window-256"]).items()}
    assert "labels/segmentation/2" in ref
    for name, store in variants.items():
        got = read_store(store)
        for key in ref:
            if key[0].isdigit() and key not in got:
                continue  # a shard size changes nothing but the image copy's layout
            np.testing.assert_array_equal(got[key], ref[key], err_msg=f"{name}: {key}")


def test_writer_processes_were_used(variants):
    write = read_record(variants["writer-processes"])["stats"]
    assert write["stages"]["write"]["processes"] is True
    assert write["stages"]["write"]["items"] == 36  # 6 × 6 shards of 256²


def test_halo_overhead_is_reported_and_falls_with_the_window(variants):
    stats = {name: read_record(s)["stats"] for name, s in variants.items()}
    small, whole = stats["window-256"], stats["window-shard"]
    # 1500×1300 in 256² windows + 2×48 halo vs one 1504×1304 (+ halo) window
    assert small["halo_overhead"] > 1.8 > 1.2 > whole["halo_overhead"]
    assert whole["window"] == 2048  # the default shard


def test_every_source_chunk_is_decoded_once(variants):
    """Shards overlap by 2 × halo; the block cache still decodes each TIFF tile once."""
    for name, store in variants.items():
        read = read_record(store)["stats"]["stages"]["read"]
        assert read["max_decodes_per_chunk"] == 1, name
        assert read["decoded_chunks"] > 0


def test_parts_needed_a_band_later_wait_on_disk_with_the_same_bits(
    slide, variants, tmp_path, monkeypatch
):
    """Kept parts needed only many reads later (a band boundary as wide as the image) go
    to the spill file and come back exact: spilling everything (``SPILL_AFTER`` 0) gives
    the same store as the CLI's, every chunk decoded once, the file empty at the end."""
    from segloop.pipeline import read
    from segloop.pipeline.segment import SegmentOptions, segment

    monkeypatch.setattr(read, "SPILL_AFTER", 0)
    spilled = []
    close = read.SpillFile.close

    def closing(self):
        spilled.append((self.parked, self._bytes))
        close(self)

    monkeypatch.setattr(read.SpillFile, "close", closing)
    out = tmp_path / "spill.zarr"
    stats = segment(slide[0], out, SegmentOptions(tile=256, shard=256))["stats"]["stages"]
    assert stats["read"]["spilled_parts"] > 0 and stats["read"]["max_decodes_per_chunk"] == 1
    assert spilled == [(stats["read"]["spilled_parts"], 0)]  # every part taken back
    ref, got = read_store(variants["shard-256-writers-3"]), read_store(out)
    for key in ref:
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)


def test_spill_keeps_the_cache_flat_across_a_wide_band_boundary(tmp_path):
    """A wide image read in ``shard_order`` with 2 bands: without spilling, the boundary's
    block rows stay in memory for a whole band; spilled, the cache holds far less, and
    every region still comes back exact, each chunk decoded once."""
    img = tmp_path / "wide.ome.tif"
    write_ome_tiff(img, 1024, 8192, seed=4, compression="zlib")
    src, whole = open_image(img), tifffile.imread(img)
    grid = TileGrid.create(src.height, src.width, 256, 48, 8, shard=256)
    order = grid.shard_order(band=2)
    peaks = {}
    for spill_after in (None, 4):
        plans = [plan_windows(grid, k) for k in order]
        cache = BlockCache(src, (p[1] for p in plans), spill_after)
        for _, box in plans:
            np.testing.assert_array_equal(cache.read(box), whole[box[0] : box[1], box[2] : box[3]])
        assert max(cache.decodes.values()) == 1
        peaks[spill_after] = cache.peak_bytes, cache.spill.parked
        cache.spill.close()
    assert peaks[None][1] == 0 < peaks[4][1]
    row_bytes = src.width * cache.block[0] * src.channels
    assert peaks[4][0] < 0.5 * row_bytes < row_bytes < peaks[None][0]


def test_block_cache_memory_is_a_band_not_the_image(tmp_path):
    """A 4096×1024 strip-free tiled image, shards of 512: the cache never holds more than
    about two block rows of the image (the band shared by consecutive shard rows), and of
    blocks that later reads need only in part it keeps only that part (halo rows): held
    bytes stay under 2.5 block rows (keeping whole blocks held 3)."""
    img = tmp_path / "tall.ome.tif"
    write_ome_tiff(img, 4096, 1024, seed=3, compression="zlib")
    src = open_image(img)
    grid = TileGrid.create(src.height, src.width, 256, 48, 8, shard=512)
    plans = [plan_windows(grid, k) for k in grid.shards()]
    cache = BlockCache(src, (p[1] for p in plans))
    whole = tifffile.imread(img)
    for _, box in plans:
        region = cache.read(box)
        np.testing.assert_array_equal(region, whole[box[0] : box[1], box[2] : box[3]])
    bw = cache.block[1]
    per_row = -(-src.width // bw)
    assert max(cache.decodes.values()) == 1
    assert sum(cache.decodes.values()) == len(cache.decodes)
    assert cache.peak_blocks <= 3 * per_row < len(cache.decodes)
    row_bytes = src.width * cache.block[0] * src.channels
    assert cache.peak_bytes < 2.5 * row_bytes


def test_a_block_released_by_two_readers_at_once(tmp_path):
    """Two shards share a block; the first reader is cutting the block down to what the
    second still needs when the second releases it (one reader thread each in a job).
    The first then finds the block dropped: no error, nothing kept (the 100k × 80k run
    once died here with ``min() arg is an empty sequence``)."""
    import threading
    from concurrent.futures import Future

    img = tmp_path / "small.ome.tif"
    write_ome_tiff(img, 512, 512, seed=3, compression="zlib")
    cache = BlockCache(open_image(img), [])
    a, b = (0, 40, 0, 512), (20, 60, 0, 512)  # both in block (0, 0), different rows
    key = (0, 0)
    cache._pending[key] = [a, b]
    decoded = cache._get(key)
    cutting, released = threading.Event(), threading.Event()

    class Paused(Future):  # the first reader stops where it has let go of the lock
        def result(self, timeout=None):
            cutting.set()
            assert released.wait(60)
            return super().result(timeout)

    fut = Paused()
    fut.set_result(decoded)
    cache._cached[key] = fut
    errors: list[BaseException] = []

    def first() -> None:
        try:
            cache._release(key, a)
        except BaseException as exc:  # reported below
            errors.append(exc)

    t = threading.Thread(target=first)
    t.start()
    assert cutting.wait(60)
    cache._release(key, b)  # the second reader: the block's last read, dropped
    released.set()
    t.join(60)
    assert errors == [] and key not in cache._cached and cache._held_bytes == 0


def test_finished_shards_are_freed_at_once(slide, tmp_path):
    """A written shard (its source region and label buffers) is freed by reference
    counting alone, not left in a cycle for the collector: with the cyclic collector off,
    no shard outlives the job (each is ~20 MB at the default shard size)."""
    import gc
    import weakref

    import segloop.pipeline.read as read
    from segloop.pipeline.segment import SegmentOptions, segment

    made: list[weakref.ref] = []
    original = read.ShardWork.__init__

    def tracked(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(weakref.ref(self))

    read.ShardWork.__init__ = tracked
    gc.disable()
    try:
        segment(slide[0], tmp_path / "s.zarr", SegmentOptions(tile=256, shard=256))
        alive = sum(r() is not None for r in made)
    finally:
        gc.enable()
        read.ShardWork.__init__ = original
    assert len(made) >= 30 and alive == 0


def test_pyramid_quarters_stay_few_in_shard_order(tmp_path, monkeypatch):
    """A wide image (4 × 16 shards): in ``TileGrid.shard_order`` every pyramid parent is
    built right after its children, so the quarters waiting stay a few per level; in
    row-major order a whole row of them waits for the next row (the bound fails)."""
    from segloop.bench.zero_model import identity_model
    from segloop.pipeline.segment import SegmentOptions, default_model, segment

    img = tmp_path / "wide.ome.tif"
    write_ome_tiff(img, 1024, 4096, seed=5)
    zero = identity_model(default_model(), tmp_path / "zero.onnx")
    grid = TileGrid.create(1024, 4096, 256, 48, 8, shard=256)
    order = grid.shard_order()
    assert sorted(order) == sorted(grid.shards()) and len(set(order)) == len(order)
    bound = 3 * (grid.levels - 1)

    def peak(name: str) -> int:
        opts = SegmentOptions(model=zero, tile=256, shard=256)
        stats = segment(img, tmp_path / name, opts)["stats"]["stages"]
        return stats["write"]["peak_quarters"]

    assert peak("z.zarr") <= bound
    monkeypatch.setattr(TileGrid, "shard_order", lambda self, band=8: list(self.shards()))
    assert peak("rows.zarr") > bound


def test_a_full_temporary_folder_is_a_user_error(monkeypatch):
    """The spill file cannot be written (here: the folder is full): one message naming the
    temporary folder and TMPDIR, not a traceback about the store."""
    import errno
    import os

    from segloop.errors import UserError
    from segloop.pipeline import read

    spill = read.SpillFile()

    def full(*_a):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(read.os, "pwrite", full)
    with pytest.raises(UserError, match="TMPDIR") as err:
        spill.put(np.zeros((4, 4, 3), np.uint8))
    assert "No space left" in str(err.value)
    spill.close()


def test_segment_batch_runs_every_slide_on_one_runtime(slide, tmp_path, monkeypatch):
    """A local batch opens one runtime for all its slides (the model loads and fills its
    memory once); each store is bit-identical to its slide segmented on its own."""
    import segloop.pipeline.job as job
    from segloop.pipeline.batch import run_batch
    from segloop.pipeline.segment import SegmentOptions, segment

    second = tmp_path / "other.ome.tif"
    write_ome_tiff(second, 700, 900, seed=3)
    opts = SegmentOptions(tile=256, shard=256, threads=1)
    made = []
    real = job.create_runtime

    def counted(*args, **kwargs):
        made.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(job, "create_runtime", counted)
    rows = run_batch([slide[0], second], tmp_path / "out", opts)
    assert [r["status"] for r in rows] == ["complete", "complete"]
    assert made == ["onnx"]
    for image, name in ((slide[0], "slide.zarr"), (second, "other.zarr")):
        alone = tmp_path / f"alone-{name}"
        segment(image, alone, opts)
        batch, ref = read_store(tmp_path / "out" / name), read_store(alone)
        assert batch.keys() == ref.keys()
        for key in ref:
            np.testing.assert_array_equal(batch[key], ref[key], err_msg=key)
    assert len(made) == 3  # the two single runs made their own


def test_segment_batch_with_a_model_that_cannot_load_leaves_nothing(slide, tmp_path):
    """The batch's one runtime is made first: a broken model is one line, exit 2, and no
    output folder."""
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    out = tmp_path / "out"
    proc = run_cli("segment-batch", slide[0], "-o", out, "--model", bad)
    assert proc.returncode == 2, proc.stderr
    assert "not a readable ONNX model" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()

"""Bad input: one clear line on stderr, exit 2, no traceback, nothing lost or half-done."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from tests.conftest import assert_user_error, run_cli


def test_missing_input(tmp_path):
    assert_user_error(
        run_cli("segment", tmp_path / "nope.tif", "-o", tmp_path / "o.zarr"), "not found"
    )
    assert not (tmp_path / "o.zarr").exists()


def test_directory_input(tmp_path):
    (tmp_path / "d").mkdir()
    assert_user_error(
        run_cli("segment", tmp_path / "d", "-o", tmp_path / "o.zarr"), "neither a zarr store"
    )


def test_non_image_file(tmp_path):
    f = tmp_path / "notes.tif"
    f.write_text("this is text, not a TIFF\n" * 10)
    assert_user_error(run_cli("segment", f, "-o", tmp_path / "o.zarr"), "not a supported image")


def test_empty_file(tmp_path):
    (tmp_path / "e.tif").write_bytes(b"")
    assert_user_error(run_cli("segment", tmp_path / "e.tif", "-o", tmp_path / "o.zarr"), "empty")


def test_truncated_tiff(tmp_path, slide):
    data = slide[0].read_bytes()
    bad = tmp_path / "cut.ome.tif"
    bad.write_bytes(data[: len(data) // 2])
    assert_user_error(run_cli("segment", bad, "-o", tmp_path / "o.zarr"), "truncated")


def test_corrupt_tile_data(tmp_path):
    """Header intact, compressed tile bytes garbage: a clear error, store not complete."""
    img = tmp_path / "c.tif"
    tifffile.imwrite(
        img,
        np.full((512, 512, 3), 128, np.uint8),
        tile=(256, 256),
        compression="zlib",
        photometric="rgb",
    )
    with tifffile.TiffFile(img) as t:
        off, n = t.pages[0].dataoffsets[1], t.pages[0].databytecounts[1]
    raw = bytearray(img.read_bytes())
    raw[off : off + n] = b"\x00\xff" * (n // 2) + b"\x00" * (n % 2)
    img.write_bytes(bytes(raw))
    out = tmp_path / "o.zarr"
    proc = run_cli("segment", img, "-o", out, "--tile", "256")
    assert_user_error(proc, "corrupt")
    assert '"status": "complete"' not in (out / "segloop" / "segloop.json").read_text()
    assert "ome" not in zarr.open_group(out, mode="r").attrs


def test_zero_size_image(tmp_path):
    z = zarr.create_array(tmp_path / "z.zarr", shape=(0, 10), dtype=np.uint8, chunks=(8, 8))
    assert z.shape == (0, 10)
    assert_user_error(run_cli("segment", tmp_path / "z.zarr", "-o", tmp_path / "o.zarr"), "empty")


def test_huge_header_tiny_file(tmp_path):
    """A TIFF header claiming 10⁶×10⁶ pixels in a few hundred bytes: refused, no allocation."""
    f = tmp_path / "huge.tif"
    tifffile.imwrite(f, np.zeros((16, 16), np.uint8), tile=(16, 16))
    raw = bytearray(f.read_bytes())
    # patch ImageWidth (256) and ImageLength (257) in the first IFD to 1,000,000
    ifd = struct.unpack_from("<I", raw, 4)[0]
    n = struct.unpack_from("<H", raw, ifd)[0]
    for i in range(n):
        e = ifd + 2 + 12 * i
        tag, _typ = struct.unpack_from("<HH", raw, e)
        if tag in (256, 257):
            struct.pack_into("<HHII", raw, e, tag, 4, 1, 1_000_000)
    f.write_bytes(bytes(raw))
    proc = run_cli("segment", f, "-o", tmp_path / "o.zarr", timeout=60)
    assert_user_error(proc)
    assert "huge.tif" in proc.stderr


@pytest.mark.parametrize(
    ("shape", "dtype", "axes", "word"),
    [
        ((64, 64, 3), np.float64, "YXS", "uint8 or uint16"),
        ((2, 3, 1, 64, 64), np.uint8, "TZCYX", "2-D"),
        ((2, 64, 64), np.uint8, "CYX", "channels"),
    ],
)
def test_refused_pixel_layouts(tmp_path, shape, dtype, axes, word):
    f = tmp_path / "x.ome.tif"
    tifffile.imwrite(
        f,
        np.zeros(shape, dtype),
        metadata={"axes": axes},
        photometric="rgb" if axes == "YXS" else "minisblack",
    )
    assert_user_error(run_cli("segment", f, "-o", tmp_path / "o.zarr"), word)


def test_five_d_with_singletons_is_accepted(tmp_path):
    """Documented rule: singleton T/Z/C axes are dropped, so 1×1×1×Y×X is a 2-D image."""
    f = tmp_path / "x.ome.tif"
    tifffile.imwrite(f, np.full((1, 1, 1, 40, 56), 200, np.uint8), metadata={"axes": "TZCYX"})
    proc = run_cli("segment", f, "-o", tmp_path / "o.zarr", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert zarr.open_array(tmp_path / "o.zarr/0", mode="r").shape == (1, 40, 56)


def test_existing_output_needs_overwrite(tmp_path, slide):
    out = tmp_path / "taken"
    out.mkdir()
    keep = out / "precious.txt"
    keep.write_text("data")
    assert_user_error(run_cli("segment", slide[0], "-o", out), "--overwrite")
    assert keep.read_text() == "data"
    # even --overwrite does not delete a folder that is not a store
    assert_user_error(run_cli("segment", slide[0], "-o", out, "--overwrite"), "refusing")
    assert keep.read_text() == "data"


def test_unwritable_output(tmp_path, slide):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_user_error(run_cli("segment", slide[0], "-o", blocker / "o.zarr"), "cannot create")


def test_bad_tile(tmp_path, slide):
    assert_user_error(
        run_cli("segment", slide[0], "-o", tmp_path / "o.zarr", "--tile", "100"), "multiple of 8"
    )


def test_device_cuda_needs_torch_and_a_gpu(tmp_path, slide):
    out = tmp_path / "o.zarr"
    assert_user_error(
        run_cli("segment", slide[0], "-o", out, "--device", "cuda"), "--runtime torch"
    )
    proc = run_cli("bench", "segment", "--size", "512", "--device", "cuda")
    assert_user_error(proc, "--runtime torch")
    if not torch_sees_cuda():
        proc = run_cli("segment", slide[0], "-o", out, "--runtime", "torch", "--device", "cuda")
        assert_user_error(proc, "no CUDA GPU")
        assert not out.exists()  # refused before anything was written


def torch_sees_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_synth_refuses_existing(tmp_path):
    f = tmp_path / "s.ome.tif"
    f.write_text("keep")
    assert_user_error(run_cli("synth", f, "--size", "64"), "--overwrite")
    assert f.read_text() == "keep"


@pytest.fixture
def tiny_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a small filesystem for the disk-full test")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full_is_clear_and_resumable(tmp_path, tiny_fs, slide):
    out = tiny_fs / "o.zarr"
    proc = run_cli("segment", slide[0], "-o", out, "--tile", "256", "--shard", "256")
    assert_user_error(proc, "disk full", "resume")
    assert '"status": "running"' in (out / "segloop" / "segloop.json").read_text()
    # move the partial store to a roomy disk and finish it there: resume, same result
    roomy = tmp_path / "o.zarr"
    shutil.copytree(out, roomy)
    ok = run_cli("segment", slide[0], "-o", roomy, "--tile", "256", "--shard", "256", "--quiet")
    assert ok.returncode == 0, ok.stderr
    assert '"status": "complete"' in (roomy / "segloop" / "segloop.json").read_text()
    assert Path(roomy / "labels/segmentation/0").exists()

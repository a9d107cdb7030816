"""The segloop output store: OME-Zarr 0.5 (zarr v3).

```
out.zarr/
  zarr.json                      ome.multiscales for the image (axes c, y, x)
  0/ 1/ …                        image pyramid (source dtype, 2×2 mean)
  labels/segmentation/0 1 …      uint8 classes (y, x), image-label colours + names (2×2 mode)
  confidence/0 1 …               uint8 confidence (y, x), 255 = certain (2×2 mean)
  tiles/uncertainty              float32 per level-0 tile (ty, tx): mean of 1 − conf/255
  tiles/model_version            uint16 per level-0 tile: model version that produced it
  segloop/                       segloop's own files, where zarr does not look:
    zarr.json                    … an empty (0,) array: a leaf, so zarr never lists inside
    segloop.json                 run record: status, parameters, model, stats
    segloop.manifest             finished shards, one "level sy sx" line each (resume)
    segloop.lock                 one writing process at a time
    review.sqlite                the review database (users, edits, states, versions)
```
A store made before ``segloop/`` existed keeps those files at its root and is read (and
resumed, served) as it is: ``own_key`` finds them where they are.
Chunks are ``tile``², shards ``shard``²; every shard is written whole by one writer.
The OME metadata is written last, so an unfinished store does not look like an image.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.sync import sync

from segloop.errors import UserError
from segloop.io.location import Location
from segloop.io.pixel_size import STORE_UNIT
from segloop.io.source import Mpp
from segloop.tiling import TileGrid

RECORD = "segloop.json"
#: the store's folder of segloop's own files (``own_key``)
OWN = "segloop"
OWN_NOTE = (
    "segloop's own files (run record, resume manifest, lock, review database): an empty "
    "array, so that zarr never lists inside this folder"
)
LAYERS = ("image", "segmentation", "confidence")
#: a region of one array and its values, for ``OutputStore.put``
Part = tuple[zarr.Array, tuple[Any, ...], np.ndarray]
#: per-tile arrays (one value per level-0 chunk), chunked so one shard owns one chunk
TILE_ARRAYS = {"uncertainty": np.float32, "model_version": np.uint16}
_PREFIX = {"image": "", "segmentation": "labels/segmentation/", "confidence": "confidence/"}
# zstd-1 without shuffle: measured fastest to write at about the same ratio (labels ~33×);
# then a crc32c of each compressed chunk, so `segloop check` and every read catch damage
_COMPRESSOR = (BloscCodec(cname="zstd", clevel=1, shuffle="noshuffle"), Crc32cCodec())
#: the codec pipeline of the arrays the write stage writes (``OutputStore.shard_part``):
#: zarrs, in Rust, encodes a shard's chunks off the GIL without zarr-python's per-chunk
#: Python (2048² labels + confidence: 36 vs 56 ms CPU, 24 vs 37 ms wall, 2-core Xeon).
#: Reads keep zarr-python's pipeline: zarrs 0.2.3 does not verify crc32c (tested).
_WRITE_PIPELINE = {"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}
_WRITE_OPEN = threading.Lock()  # zarr's config is global: one opening at a time
#: how zarrs words a failed file operation
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _as_os_error(exc: BaseException) -> BaseException:
    """``exc`` as the OSError it is when zarrs reports one as ``RuntimeError("… (os error
    N)")`` (errno N: a full disk, a denied write), so that disk-full and permission
    handling see it; any other exception unchanged."""
    if isinstance(exc, RuntimeError) and (m := _OS_ERROR.search(str(exc))):
        code = int(m.group(1))
        return OSError(code, f"{os.strerror(code)}: {exc}")
    return exc


# per layer (16 chunks of 512², the shipped / zero-cost model's output, 2-core EPYC): labels
# zstd-1 on bit planes (a few classes: the high planes vanish) 5.8 vs 7.2 ms, 205 vs 189 KB
# (zero-cost: 5.2 vs 9.9 ms, 266 vs 499 KB). Confidence stays zstd-1: lz4 took 3.4 vs 7.6 ms
# but 646 vs 388 KB (store ÷ source 0.66 → 0.97 on the 4096² bench image)
_LAYER_COMPRESSOR = {
    "segmentation": (BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle"), Crc32cCodec()),
    "confidence": _COMPRESSOR,
}


def array_path(layer: str, level: int) -> str:
    return f"{_PREFIX[layer]}{level}"


def own_key(where: Path | str | Location, name: str) -> str:
    """Key (path inside the store) of segloop's own file ``name`` (``segloop.json``,
    ``segloop.manifest``, ``segloop.lock``, ``review.sqlite``): ``segloop/<name>``, or
    ``<name>`` at the root of a store made before ``segloop/`` existed."""
    loc = Location.of(where)
    if not loc.exists(f"{OWN}/zarr.json") and loc.exists(RECORD):
        return name  # an older store: its files stay where they are
    return f"{OWN}/{name}"


def own_path(store: Path, name: str) -> Path:
    """Local path of segloop's own file ``name`` in ``store`` (see ``own_key``)."""
    return store / own_key(store, name)


def make_own(where: Path | str | Location) -> None:
    """Create ``segloop/``: a (0,) uint8 zarr array whose folder holds segloop's files."""
    loc = Location.of(where)
    if loc.exists(f"{OWN}/zarr.json") or loc.exists(RECORD):  # made, or an older store
        return
    zarr.create_array(
        Location(f"{loc}/{OWN}", loc.options).zarr_store(),
        shape=(0,),
        dtype="uint8",
        zarr_format=3,
        compressors=_COMPRESSOR,  # like every array: `segloop check` expects checksums
        attributes={"segloop": OWN_NOTE},
    )


def read_record(where: Path | str | Location) -> dict[str, Any] | None:
    """The run record of a store (local or remote), or None when absent/unreadable."""
    try:
        data = Location.of(where).read_bytes(own_key(where, RECORD))
        return None if data is None else json.loads(data)
    except (OSError, ValueError):
        return None


def write_record(where: Path | str | Location, record: dict[str, Any]) -> None:
    """Atomic replace (local: write, fsync, rename; remote: one PUT)."""
    loc = Location.of(where)
    make_own(loc)
    loc.write_bytes(own_key(loc, RECORD), json.dumps(record, indent=2).encode())


class StoreLock:
    """Exclusive advisory lock on a store (``segloop/segloop.lock``): one writing process at
    a time (the review server, or a re-segmentation); a second one gets a clear error."""

    def __init__(self, path: Path) -> None:
        self.store = path
        self.path = own_path(path, "segloop.lock")
        self._fh = None

    def __enter__(self) -> StoreLock:
        fh = self.path.open("a")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise UserError(
                f"{self.store} is in use by another segloop process (segloop serve?); stop it first"
            ) from None
        self._fh = fh
        return self

    def __exit__(self, *exc) -> None:
        if self._fh is not None:
            self._fh.close()  # closing releases the lock
            self._fh = None


def remove_store(where: Path | str | Location) -> None:
    """Delete an existing output for ``--overwrite``; refuses anything that is not a store."""
    loc = Location.of(where)
    if not loc.exists():
        return
    if loc.local and not loc.path.is_dir():
        loc.path.unlink()
        return
    if not any(loc.exists(m) for m in ("zarr.json", RECORD, ".zgroup")) and not (
        loc.is_empty_folder()
    ):
        raise UserError(
            f"{loc} is a non-empty folder that is not a zarr store; "
            "refusing to delete it even with --overwrite"
        )
    loc.remove()


class OutputStore:
    """Arrays of one segloop store; ``create`` makes them, ``open`` reopens for resume."""

    def __init__(
        self, path: Path | str | Location, grid: TileGrid, channels: int, dtype: np.dtype
    ) -> None:
        self.path = path
        self.grid = grid
        self.channels = channels
        self.dtype = np.dtype(dtype)
        self.root = zarr.open_group(Location.of(path).zarr_store(), mode="a", zarr_format=3)
        #: the layers this store holds: the image copy is optional (``create(copy_image=)``)
        self.layers = LAYERS if array_path("image", 0) in self.root else LAYERS[1:]
        self._writing: dict[str, zarr.Array] = {}  # ``_for_writes``

    @classmethod
    def create(
        cls,
        path: Path | str | Location,
        grid: TileGrid,
        channels: int,
        dtype: np.dtype,
        copy_image: bool = True,
    ) -> OutputStore:
        """New arrays for every level; the image pyramid only with ``copy_image``."""
        store = cls(path, grid, channels, dtype)
        for level in range(grid.levels):
            h, w = grid.level_shape(level)
            if copy_image:
                store._create(array_path("image", level), (channels, h, w), dtype, ("c", "y", "x"))
            for layer in ("segmentation", "confidence"):
                store._create(
                    array_path(layer, level), (h, w), np.uint8, ("y", "x"), _LAYER_COMPRESSOR[layer]
                )
        per = grid.shard // grid.tile
        for name, dtype in TILE_ARRAYS.items():
            store.root.create_array(
                f"tiles/{name}",
                shape=store.tile_grid,
                dtype=dtype,
                chunks=(per, per),
                fill_value=np.nan if name == "uncertainty" else 0,  # NaN: not segmented yet
                compressors=_COMPRESSOR,
                dimension_names=("ty", "tx"),
            )
        store.layers = LAYERS if copy_image else LAYERS[1:]
        make_own(path)
        return store

    @property
    def tile_grid(self) -> tuple[int, int]:
        """(ny, nx) level-0 tiles (= chunks)."""
        t = self.grid.tile
        return -(-self.grid.height // t), -(-self.grid.width // t)

    def _create(
        self, name: str, shape: tuple[int, ...], dtype, dims: tuple[str, ...], codecs=_COMPRESSOR
    ) -> None:
        t, s = self.grid.tile, self.grid.shard
        self.root.create_array(
            name,
            shape=shape,
            dtype=dtype,
            chunks=(*shape[:-2], t, t)[-len(shape) :],
            shards=(*shape[:-2], s, s)[-len(shape) :],
            compressors=codecs,
            fill_value=0,
            dimension_names=dims,
        )

    def array(self, layer: str, level: int) -> zarr.Array:
        return self.root[array_path(layer, level)]

    def _for_writes(self, key: str) -> zarr.Array:
        """Array ``key`` as the write stage writes it (``_WRITE_PIPELINE``; no all-equal
        test of a shard, then of each chunk: CPU per 2048² shard of labels + confidence
        50 → 32 ms with zarr's pipeline; a chunk of zeros is then stored, 236 bytes,
        instead of left out: the same values read back), opened once per store."""
        arr = self._writing.get(key)
        if arr is None:
            with _WRITE_OPEN, zarr.config.set(_WRITE_PIPELINE):
                arr = self.root[key].with_config({"write_empty_chunks": True})
            self._writing[key] = arr
        return arr

    def shard_part(
        self, layer: str, level: int, box: tuple[int, int, int, int], data: np.ndarray
    ) -> Part:
        """One whole shard ``box`` = (y0, y1, x0, x1) of ``layer``; data (…, y1-y0, x1-x0)."""
        y0, y1, x0, x1 = box
        return self._for_writes(array_path(layer, level)), (..., slice(y0, y1), slice(x0, x1)), data

    def tiles_part(self, name: str, sy: int, sx: int, values: np.ndarray) -> Part:
        """Per-tile values of shard (sy, sx): ``values`` (tiles down, tiles across)."""
        per = self.grid.shard // self.grid.tile
        y0, x0 = sy * per, sx * per
        region = (slice(y0, y0 + values.shape[0]), slice(x0, x0 + values.shape[1]))
        return self._for_writes(f"tiles/{name}"), region, values

    def put(self, *parts: Part) -> None:
        """Write ``parts`` concurrently, in one call into zarr's event loop. Each call of
        zarr's sync API is a round trip through that one thread, slow while other stages
        hold the cores (the write stage's numbers: ``pipeline/write.py``). A file error
        inside zarrs is raised as the OSError it is (``_as_os_error``)."""
        try:
            sync(_set_all(parts))
        except RuntimeError as exc:
            raise _as_os_error(exc) from exc

    def write(self, layer: str, level: int, box: tuple[int, int, int, int], data: np.ndarray):
        """Write one whole shard ``box`` = (y0, y1, x0, x1); data (…, y1-y0, x1-x0)."""
        self.put(self.shard_part(layer, level, box, data))

    def read(self, layer: str, level: int, box: tuple[int, int, int, int]) -> np.ndarray:
        y0, y1, x0, x1 = box
        return self.array(layer, level)[..., y0:y1, x0:x1]

    def read_tiles(self, name: str) -> np.ndarray:
        """(ny, nx) per-tile array ``name`` (see ``TILE_ARRAYS``)."""
        return self.root[f"tiles/{name}"][...]

    def write_ome_metadata(
        self, classes: list[str], colors: list[list[int]], mpp: Mpp | None = None
    ) -> None:
        """Multiscales for image (when copied), labels and confidence; image-label colours
        and names; ``omero`` channel colours so viewers show RGB as one colour image; and
        a ``segloop`` root attribute naming every layer (OME-Zarr has no slot for a
        non-label layer such as confidence: it is an OME-Zarr image of its own).

        ``mpp``: µm/px (y, x) of level 0; the y and x axes then carry the unit
        "micrometer" and level k the scale mpp × 2^k (without it: pixels, no unit)."""
        levels = self.grid.levels
        copied = "image" in self.layers
        um = mpp or (1.0, 1.0)

        def multiscale(name: str, axes: list[dict], c: bool) -> dict:
            return {
                "name": name,
                "axes": axes,
                "datasets": [
                    {
                        "path": str(k),
                        "coordinateTransformations": [
                            {
                                "type": "scale",
                                "scale": ([1.0] if c else []) + [um[0] * 2**k, um[1] * 2**k],
                            }
                        ],
                    }
                    for k in range(levels)
                ],
            }

        unit = {"unit": STORE_UNIT} if mpp else {}
        yx = [{"name": a, "type": "space", **unit} for a in "yx"]
        c = [{"name": "c", "type": "channel"}]
        self.root.require_group("labels").attrs["ome"] = {
            "version": "0.5",
            "labels": ["segmentation"],
        }
        image_label = {
            "version": "0.5",
            "colors": [{"label-value": i, "rgba": rgba} for i, rgba in enumerate(colors)],
            "properties": [{"label-value": i, "class": n} for i, n in enumerate(classes)],
        }
        if copied:
            image_label["source"] = {"image": "../../"}
        self.root["labels/segmentation"].attrs["ome"] = {
            "version": "0.5",
            "multiscales": [multiscale("segmentation", yx, False)],
            "image-label": image_label,
        }
        self.root["confidence"].attrs["ome"] = {
            "version": "0.5",
            "multiscales": [multiscale("confidence", yx, False)],
            "omero": {"channels": [_channel("confidence", "FFFFFF", 255)], "rdefs": {}},
        }
        layers = {"labels": "labels/segmentation", "confidence": "confidence"}
        if copied:
            self.root.attrs["ome"] = {
                "version": "0.5",
                "multiscales": [multiscale("image", c + yx, True)],
                "omero": _omero(self.channels, self.dtype),
            }
            layers["image"] = ""
        self.root.attrs["segloop"] = {"layers": layers}


def _channel(label: str, color: str, top: int, active: bool = True) -> dict[str, Any]:
    return {
        "label": label,
        "color": color,
        "active": active,
        "window": {"start": 0, "end": top, "min": 0, "max": top},
    }


def _omero(channels: int, dtype: np.dtype) -> dict[str, Any]:
    """OMERO rendering: RGB(A) as red, green, blue (alpha off), gray as white."""
    top = int(np.iinfo(dtype).max)
    if channels == 1:
        chans = [_channel("gray", "FFFFFF", top)]
    else:
        chans = [
            _channel(n, col, top)
            for n, col in zip("RGB", ("FF0000", "00FF00", "0000FF"), strict=True)
        ]
        if channels == 4:
            chans.append(_channel("A", "FFFFFF", top, active=False))
    return {"channels": chans, "rdefs": {"model": "color"}}


async def _set_all(parts: tuple[Part, ...]) -> None:
    await asyncio.gather(*(arr.async_array.setitem(region, v) for arr, region, v in parts))

"""Every model version's predictions of the tiles it re-predicted, kept for rollback.

``STORE/segloop/learn/predictions/v<N>/`` is a zarr group: ``labels`` and ``confidence``
(H, W) uint8 at level 0, one chunk per store tile (zstd), and ``uncertainty`` (ny, nx)
float32, NaN for a tile version N never predicted (written after the tile's pixels: a
number there means the pixels are in). The learner writes its new version's group;
the review server writes the group of the version a tile showed before a new one
replaced it (the store's own predictions, the first time), so a rollback to any
version finds what that version showed. One writer per group at a time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from segloop.io.ome_zarr import own_path
from segloop.review.image import Prediction

#: where the learner keeps its rounds and the archive, in the store's own folder
LEARN_DIR = "learn"


def learn_dir(store: Path) -> Path:
    return own_path(store, LEARN_DIR)


class Archive:
    """One model version's predictions in ``store`` (see the module docstring); the
    group is created on first write when ``shape`` (H, W) and ``tile`` are given."""

    def __init__(self, store: Path, version: int, shape: tuple[int, int], tile: int) -> None:
        self.path = learn_dir(store) / "predictions" / f"v{version}"
        self.version, self.shape, self.tile = version, shape, tile
        self.grid = (-(-shape[0] // tile), -(-shape[1] // tile))
        self._root: zarr.Group | None = None

    def _open(self, create: bool) -> zarr.Group | None:
        if self._root is None:
            if (self.path / "zarr.json").exists():
                self._root = zarr.open_group(self.path, mode="r+")
            elif create:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                root = zarr.open_group(self.path, mode="w")
                codec = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
                for name in ("labels", "confidence"):
                    root.create_array(
                        name, shape=self.shape, chunks=(self.tile, self.tile), dtype="uint8",
                        compressors=codec, fill_value=0,
                    )  # fmt: skip
                root.create_array(
                    "uncertainty", shape=self.grid, chunks=self.grid, dtype="float32",
                    fill_value=np.nan,
                )  # fmt: skip
                self._root = root
        return self._root

    def held(self) -> np.ndarray:
        """(ny, nx) bool: the tiles this version's predictions are kept for."""
        root = self._open(create=False)
        if root is None:
            return np.zeros(self.grid, bool)
        return ~np.isnan(root["uncertainty"][...])

    def _box(self, ty: int, tx: int) -> tuple[slice, slice]:
        t = self.tile
        return slice(ty * t, min(self.shape[0], (ty + 1) * t)), slice(
            tx * t, min(self.shape[1], (tx + 1) * t)
        )

    def write(self, tiles: dict[tuple[int, int], Prediction]) -> None:
        """Keep ``tiles`` (pixels first, then their uncertainty: the mark they are in)."""
        if not tiles:
            return
        root = self._open(create=True)
        for (ty, tx), p in tiles.items():
            box = self._box(ty, tx)
            root["labels"][box] = p.labels
            root["confidence"][box] = p.confidence
        doubt = root["uncertainty"][...]
        for (ty, tx), p in tiles.items():
            doubt[ty, tx] = p.uncertainty
        root["uncertainty"][...] = doubt

    def read(self, tiles: list[tuple[int, int]]) -> dict[tuple[int, int], Prediction]:
        """The kept predictions of those of ``tiles`` this version has."""
        root = self._open(create=False)
        if root is None:
            return {}
        doubt = root["uncertainty"][...]
        out = {}
        for ty, tx in tiles:
            if np.isnan(doubt[ty, tx]):
                continue
            box = self._box(ty, tx)
            out[ty, tx] = Prediction(
                root["labels"][box], root["confidence"][box], float(doubt[ty, tx]), self.version
            )
        return out

"""``ImageSource``: a 2-D image read by region, whatever the file format.

Axis rule: singleton axes are dropped; what remains must be Y, X and at most one channel
axis (``C`` or ``S``) of 1 (gray), 3 (RGB) or 4 (RGBA) channels. dtype uint8 or uint16.
Anything else (float, 5-D stacks with T/Z > 1, 2-channel) is refused with a message.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segloop.errors import UserError
from segloop.io.tiff_level import TiffLevel

CHANNEL_AXES = ("C", "S")
#: physical pixel size, µm/px along (y, x)
Mpp = tuple[float, float]


class ImageSource:
    """Region reads from an array-like with named axes.

    array: anything sliceable (zarr array, numpy array); axes: one letter per array axis;
    pyramid: the coarser levels the source stores (TIFF sub-resolutions, OME-Zarr
    datasets), finest first, same axes; mpp: µm/px (y, x) of ``array``, None: unknown.
    ``read`` returns (h, w, channels) in the source dtype.
    """

    def __init__(
        self,
        array,
        axes: str,
        path: Path,
        fingerprint: str,
        pyramid: Sequence[Any] = (),
        mpp: Mpp | None = None,
    ) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self._pyramid = list(pyramid)
        #: resolution levels the source itself stores; 1: level 0 only
        self.pyramid_levels = 1 + len(self._pyramid)
        self.mpp = mpp
        #: which level of the opened file these pixels come from, and whether they were
        #: resampled from it (``pipeline.resolution``); a viewer can read the file in
        #: place only for level 0 as stored
        self.source_level = 0
        self.resampled = False
        self._array = array
        axes = axes.upper()
        shape = tuple(int(s) for s in array.shape)
        if len(axes) != len(shape):
            raise UserError(f"{path}: axes {axes!r} do not match the array shape {shape}")
        dtype = np.dtype(array.dtype)
        if dtype not in (np.uint8, np.uint16):
            raise UserError(
                f"{path}: pixel type {dtype} is not supported; convert to uint8 or uint16 "
                "(e.g. rescale floats to 0..255)"
            )
        self.dtype = dtype
        extra = [
            f"{a}={s}"
            for a, s in zip(axes, shape, strict=True)
            if a not in ("Y", "X", *CHANNEL_AXES) and s > 1
        ]
        chans = [(i, a) for i, a in enumerate(axes) if a in CHANNEL_AXES and shape[i] > 1]
        if extra or len(chans) > 1 or "Y" not in axes or "X" not in axes:
            raise UserError(
                f"{path}: axes {axes} with shape {shape} is not a single 2-D image; segloop "
                "segments one Y×X plane (gray, RGB or RGBA): extract a plane first"
            )
        self.height = shape[axes.index("Y")]
        self.width = shape[axes.index("X")]
        if self.height == 0 or self.width == 0:
            raise UserError(f"{path}: the image is empty ({self.height}×{self.width} pixels)")
        self.channels = shape[chans[0][0]] if chans else 1
        if self.channels not in (1, 3, 4):
            raise UserError(
                f"{path}: {self.channels} channels; segloop reads gray (1), RGB (3) or RGBA (4)"
            )
        self._axes = axes
        # axes left in a read result (singletons are indexed away) → transpose to (Y, X, C)
        kept = [a for i, a in enumerate(axes) if a in "YX" or (chans and i == chans[0][0])]
        wanted = ["Y", "X"] + ([chans[0][1]] if chans else [])
        self._order = [kept.index(a) for a in wanted]
        chunks = getattr(array, "chunks", None)
        #: (rows, cols) of one stored chunk (a TIFF tile or strip, a zarr chunk); None:
        #: the image is in memory (PNG/JPEG) and any region costs the same
        self.block_shape: tuple[int, int] | None = (
            (int(chunks[axes.index("Y")]), int(chunks[axes.index("X")])) if chunks else None
        )

    @property
    def servable(self) -> bool:
        """Whether a viewer can read tiles of this source in place as fast as from a copy:
        tiled (chunks narrower than the image, at most 1024 px a side) and pyramidal."""
        b = self.block_shape
        return (
            b is not None
            and max(b) <= 1024
            and (b[1] < self.width or self.width <= 1024)
            and self.pyramid_levels > 1
            and self.source_level == 0
            and not self.resampled
        )

    def pyramid_level(self, k: int) -> ImageSource:
        """Level ``k`` of the stored pyramid (0: this one) as a source of its own, its
        µm/px scaled by the size ratio to level 0."""
        if k == 0:
            return self
        array = self._pyramid[k - 1]
        level = ImageSource(array, self._axes, self.path, self.fingerprint, self._pyramid[k:])
        if self.mpp is not None:
            level.mpp = (
                self.mpp[0] * self.height / level.height,
                self.mpp[1] * self.width / level.width,
            )
        level.source_level = self.source_level + k
        return level

    @property
    def tiff_level(self) -> TiffLevel | None:
        """The ``TiffLevel`` this level is read through (a local single-page TIFF level:
        its stored tile bytes are at hand), else None."""
        return self._array if isinstance(self._array, TiffLevel) else None

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _index(self, y0: int, y1: int, x0: int, x1: int) -> tuple:
        idx = []
        for i, a in enumerate(self._axes):
            if a == "Y":
                idx.append(slice(y0, y1))
            elif a == "X":
                idx.append(slice(x0, x1))
            elif self._array.shape[i] > 1:
                idx.append(slice(None))
            else:
                idx.append(0)
        return tuple(idx)

    def _read_raw(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        block = np.asarray(self._array[self._index(y0, y1, x0, x1)])
        block = np.transpose(block, self._order) if block.ndim == 3 else block[..., None]
        return block

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Region [y0, y1) × [x0, x1) (clipped by the caller) → (h, w, C), source dtype.

        Each call decodes every stored chunk it overlaps; ``pipeline.read.BlockCache``
        makes a job decode each chunk once.
        """
        try:
            return self._read_raw(y0, y1, x0, x1)
        except UserError:
            raise
        except Exception as exc:  # decoder errors of corrupt files
            raise UserError(
                f"{self.path}: cannot decode region y={y0}:{y1} x={x0}:{x1} "
                f"({type(exc).__name__}: {exc}); the file is corrupt or truncated"
            ) from exc


def stream_fingerprint(f, size: int) -> str:
    """sha256 over size + first and last MiB of a seekable binary stream: cheap identity
    of a (huge) input file, local or remote."""
    h = hashlib.sha256()
    h.update(str(size).encode())
    f.seek(0)
    h.update(f.read(1 << 20))
    if size > 2 << 20:
        f.seek(size - (1 << 20))
        h.update(f.read(1 << 20))
    return h.hexdigest()


def file_fingerprint(path: Path) -> str:
    with path.open("rb") as f:
        return stream_fingerprint(f, path.stat().st_size)

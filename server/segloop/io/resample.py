"""A source resampled to another pixel size, read by region like any other.

Output pixel i (row or column) samples the source at (i + ½)·r − ½ (pixel centres aligned,
r = source px per output px) by linear interpolation, after a Gaussian anti-alias filter
of σ = (r − 1)/2 when downsampling (scikit-image's choice). Each output pixel depends only
on its own position and the source pixels around it (a margin beyond the filter's reach is
read), so regions resampled separately agree with the whole image resampled at once (to
float rounding of the sample positions; a job's block cache resamples each chunk once, so
all its windows see one value per pixel); image borders repeat the edge pixel.
"""

from __future__ import annotations

import math

import numpy as np

from segloop.io.source import ImageSource, Mpp

#: chunk side (px) of a resampled source: the job's block cache resamples each once
CHUNK = 512


class Resampled:
    """Lazy (h, w, channels) array of ``src`` at ``mpp`` µm/px (y, x); sliceable like a
    zarr array (ImageSource axes ``"YXC"``)."""

    def __init__(self, src: ImageSource, mpp: Mpp) -> None:
        assert src.mpp is not None
        self.src = src
        #: source pixels per output pixel, (y, x)
        self.ratio = (mpp[0] / src.mpp[0], mpp[1] / src.mpp[1])
        self.shape = (
            max(1, round(src.height / self.ratio[0])),
            max(1, round(src.width / self.ratio[1])),
            src.channels,
        )
        self.dtype = src.dtype
        self.chunks = (CHUNK, CHUNK, src.channels)
        self._sigma = tuple(max(0.0, (r - 1) / 2) for r in self.ratio)

    def _span(self, axis: int, start: int, stop: int) -> tuple[float, int, int]:
        """Source coordinate of output ``start`` and the source rows/cols [lo, hi) that
        the outputs [start, stop) need (filter reach included, clipped to the image)."""
        r, sigma, n = self.ratio[axis], self._sigma[axis], self.src.shape[axis]
        reach = int(4 * sigma + 0.5) + 1 if sigma else 0  # gaussian_filter's truncate=4
        u0 = (start + 0.5) * r - 0.5
        lo = max(0, math.floor(u0) - reach)
        hi = min(n, math.floor((stop - 0.5) * r - 0.5) + 2 + reach)
        return u0, lo, hi

    def __getitem__(self, index: tuple) -> np.ndarray:
        # here: scipy.ndimage takes ~0.4 s to import, and jobs at the model's own pixel
        # size never resample
        from scipy.ndimage import affine_transform, gaussian_filter

        ys, xs, cs = index
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        uy, ly, hy = self._span(0, y0, y1)
        ux, lx, hx = self._span(1, x0, x1)
        region = self.src.read(ly, hy, lx, hx).astype(np.float32)
        if any(self._sigma):
            region = gaussian_filter(region, (*self._sigma, 0), mode="nearest")
        out = affine_transform(
            region,
            (*self.ratio, 1.0),
            offset=(uy - ly, ux - lx, 0.0),
            output_shape=(y1 - y0, x1 - x0, self.shape[2]),
            order=1,
            mode="nearest",
        )
        top = np.iinfo(self.dtype).max
        return np.clip(np.rint(out), 0, top).astype(self.dtype)[:, :, cs]


def resampled(src: ImageSource, mpp: Mpp) -> ImageSource:
    """``src`` as a source of ``mpp`` µm/px (same path, fingerprint, source level)."""
    out = ImageSource(Resampled(src, mpp), "YXC", src.path, src.fingerprint, mpp=mpp)
    out.source_level = src.source_level
    out.resampled = True
    return out

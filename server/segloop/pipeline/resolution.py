"""Which pixels a job segments: the slide at the pixel size the model was trained at.

Rule (µm/px, per axis; "off" = the ratio of the two differs from 1 by more than 10 %):
- the slide's µm/px is ``--mpp`` if given, else what its metadata says;
- neither the slide nor the model knows its pixel size → refused (pass ``--mpp``);
- only one side knows, or the slide is not off → the slide's level 0 as it is;
- else the stored pyramid level nearest the model's µm/px (log scale, ties to the finer
  level), and when that level is itself off, that level resampled to the model's µm/px.
The store then holds that image: its level 0 (labels, confidence, image copy) is the
chosen level or its resampled version, at the µm/px written in its multiscales, so it
overlays the slide in micrometres; the image is always copied then, since a viewer reading
the slide in place would show its level 0.
"""

from __future__ import annotations

import math
from typing import Any

from segloop.errors import UserError
from segloop.io.resample import resampled
from segloop.io.source import ImageSource

#: relative pixel-size difference tolerated before another level is chosen
TOLERANCE = 0.10


def _off(mpp: tuple[float, float], model: float) -> bool:
    return any(abs(m / model - 1) > TOLERANCE for m in mpp)


def nearest_level(src: ImageSource, model_mpp: float) -> int:
    """The stored level whose µm/px is nearest ``model_mpp`` (log scale; ties: finer)."""
    assert src.mpp is not None

    def distance(k: int) -> float:
        mpp = src.pyramid_level(k).mpp
        return sum(abs(math.log(m / model_mpp)) for m in mpp)

    return min(range(src.pyramid_levels), key=lambda k: (round(distance(k), 9), k))


def for_model(src: ImageSource, model_mpp: float | None, slide_mpp: float | None) -> ImageSource:
    """The source a job segments for a model trained at ``model_mpp`` µm/px;
    ``slide_mpp`` (``--mpp``) overrides the level-0 µm/px of the slide's metadata."""
    if slide_mpp is not None:
        if not slide_mpp > 0:
            raise UserError(f"--mpp {slide_mpp}: the pixel size must be > 0 µm/px")
        src.mpp = (slide_mpp, slide_mpp)
    if src.mpp is None and model_mpp is None:
        raise UserError(
            f"{src.path}: neither the image nor the model states a pixel size; pass "
            "--mpp UM (the image's µm/px), or add the model with --mpp"
        )
    if src.mpp is None or model_mpp is None or not _off(src.mpp, model_mpp):
        return src
    level = src.pyramid_level(nearest_level(src, model_mpp))
    return resampled(level, (model_mpp, model_mpp)) if _off(level.mpp, model_mpp) else level


def pixel_size_record(src: ImageSource, model_mpp: float | None) -> dict[str, Any]:
    """What the run record says about pixel size: the segmented image's µm/px (y, x),
    the model's, and which slide level it came from (resampled or not)."""
    return {
        "mpp": list(src.mpp) if src.mpp else None,
        "model_mpp": model_mpp,
        "source_level": src.source_level,
        "resampled": src.resampled,
    }

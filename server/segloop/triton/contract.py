"""The wire contract of the ``segloop`` Triton ensemble, as code (importable anywhere;
``models.PreModel`` applies it inside the server, clients may check before sending).

A request is TILES (B, Sh, Sw, C) uint8 with B ≤ ``max_batch_size`` (16, enforced by
Triton), C ∈ {1, 3, 4} (gray, RGB, RGBA; alpha ignored), Sh and Sw multiples of the
model's downsampling factor and larger than 2·halo. Each window is a tile core plus
``halo`` px of real context on every side, reflect padded (numpy "reflect", no edge
repeat) by the client where it crosses the image border. The answer is LABELS and
CONFIDENCE (B, Sh − 2·halo, Sw − 2·halo) uint8: the cores.
"""

from __future__ import annotations

#: channel counts a window may have → which source channel feeds each model channel
CHANNELS = {1: (0, 0, 0), 3: (0, 1, 2), 4: (0, 1, 2)}


def check_windows(shape: tuple[int, ...], halo: int, multiple: int) -> str | None:
    """The rule a TILES batch of ``shape`` breaks (one sentence, no server paths), or
    None when it is valid. halo, multiple: px, from the model card."""
    if len(shape) != 4:
        return f"TILES must be (batch, height, width, channels) uint8, got shape {list(shape)}"
    _, sh, sw, c = shape
    if c not in CHANNELS:
        return f"TILES must have 1, 3 or 4 channels (gray, RGB, RGBA), got {c}"
    for name, side in (("height", sh), ("width", sw)):
        if side % multiple:
            return f"window {name} {side} must be a multiple of {multiple} (the model's stride)"
        if side <= 2 * halo:
            return (
                f"window {name} {side} must be larger than 2 × halo = {2 * halo} "
                f"(window = tile core + {halo} px of context on each side)"
            )
    return None

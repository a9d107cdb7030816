"""OME-Zarr 0.4 (zarr v2) / 0.5 (zarr v3) images and plain zarr arrays."""

from __future__ import annotations

import hashlib
from pathlib import Path

import zarr

from segloop.errors import UserError
from segloop.io.location import Location
from segloop.io.source import ImageSource


def _guess_axes(shape: tuple[int, ...]) -> str:
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3 and shape[-1] <= 4:
        return "YXC"
    if len(shape) == 3 and shape[0] <= 4:
        return "CYX"
    return "TZCYX"[-len(shape) :] if len(shape) <= 5 else "?" * len(shape)


def open_zarr(path: Path | Location) -> ImageSource:
    """Level 0 of OME multiscales, or a plain array (axes from ``dimension_names`` or
    guessed); local or on object storage."""
    loc = Location.of(path)
    try:
        node = zarr.open(loc.zarr_store(read_only=True), mode="r")
    except Exception as exc:
        raise UserError(f"{path}: cannot open zarr store ({exc})") from exc
    axes = None
    levels = 1
    if isinstance(node, zarr.Group):
        attrs = dict(node.attrs)
        multiscales = attrs.get("ome", attrs).get("multiscales")
        if not multiscales:
            raise UserError(
                f"{path}: zarr group without OME multiscales; give the array inside it "
                f"(e.g. {path}/0)"
            )
        ms = multiscales[0]
        levels = len(ms["datasets"])
        axes = "".join(a if isinstance(a, str) else a["name"] for a in ms["axes"])
        node = node[ms["datasets"][0]["path"]]
    names = getattr(node.metadata, "dimension_names", None)
    if axes is None and names and all(names):
        axes = "".join(str(n) for n in names)
    axes = (axes or _guess_axes(node.shape)).upper()
    if len(axes) != node.ndim or not set(axes) <= set("TZCSYX"):
        raise UserError(
            f"{path}: cannot tell the axes of shape {node.shape}; name them "
            "with zarr dimension_names (e.g. y, x, c)"
        )
    digest = hashlib.sha256(f"{node.shape}{node.dtype}{axes}".encode())
    for meta in ("zarr.json", ".zarray", ".zattrs"):
        digest.update(loc.read_bytes(meta) or b"")
    return ImageSource(node, axes, path, digest.hexdigest(), levels)

"""OME-Zarr 0.4 (zarr v2) / 0.5 (zarr v3) images and plain zarr arrays."""

from __future__ import annotations

import hashlib
from pathlib import Path

import zarr

from segloop.errors import UserError
from segloop.io.location import Location
from segloop.io.pixel_size import um_per_unit
from segloop.io.source import ImageSource, Mpp


def _guess_axes(shape: tuple[int, ...]) -> str:
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3 and shape[-1] <= 4:
        return "YXC"
    if len(shape) == 3 and shape[0] <= 4:
        return "CYX"
    return "TZCYX"[-len(shape) :] if len(shape) <= 5 else "?" * len(shape)


def multiscale_mpp(ms: dict) -> Mpp | None:
    """µm/px (y, x) of the first dataset of an OME multiscale: its ``scale`` (times the
    multiscale-wide one, if any) on the y and x axes, in their ``unit``; None when an
    axis has no length unit (a scale in pixels says nothing physical)."""
    names = [a if isinstance(a, str) else a.get("name") for a in ms["axes"]]
    if not {"y", "x"} <= set(names) or isinstance(ms["axes"][0], str):  # 0.3: no units
        return None
    scale = [1.0] * len(names)
    for t in [
        *ms.get("coordinateTransformations", []),
        *ms["datasets"][0].get("coordinateTransformations", []),
    ]:
        if t.get("type") == "scale" and len(t.get("scale", [])) == len(names):
            scale = [a * b for a, b in zip(scale, t["scale"], strict=True)]
    um = [um_per_unit(ms["axes"][names.index(a)].get("unit"), scale[names.index(a)]) for a in "yx"]
    return (um[0], um[1]) if all(um) else None


def open_zarr(path: Path | Location) -> ImageSource:
    """Level 0 of OME multiscales, or a plain array (axes from ``dimension_names`` or
    guessed); local or on object storage."""
    loc = Location.of(path)
    try:
        node = zarr.open(loc.zarr_store(read_only=True), mode="r")
    except Exception as exc:
        raise UserError(f"{path}: cannot open zarr store ({exc})") from exc
    axes = None
    pyramid: list[zarr.Array] = []
    mpp = None
    if isinstance(node, zarr.Group):
        attrs = dict(node.attrs)
        multiscales = attrs.get("ome", attrs).get("multiscales")
        if not multiscales:
            raise UserError(
                f"{path}: zarr group without OME multiscales; give the array inside it "
                f"(e.g. {path}/0)"
            )
        ms = multiscales[0]
        axes = "".join(a if isinstance(a, str) else a["name"] for a in ms["axes"])
        mpp = multiscale_mpp(ms)
        pyramid = [node[d["path"]] for d in ms["datasets"][1:]]
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
    return ImageSource(node, axes, path, digest.hexdigest(), pyramid, mpp)

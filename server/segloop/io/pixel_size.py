"""Physical pixel size: length units as the formats spell them, converted to µm."""

from __future__ import annotations

#: µm per unit, by the names OME-XML (symbols) and OME-Zarr (UDUNITS-2 names) use
_UM = {
    "m": 1e6,
    "meter": 1e6,
    "cm": 1e4,
    "centimeter": 1e4,
    "mm": 1e3,
    "millimeter": 1e3,
    "µm": 1.0,
    "μm": 1.0,  # Greek mu, as some writers spell it
    "um": 1.0,
    "micrometer": 1.0,
    "micron": 1.0,
    "nm": 1e-3,
    "nanometer": 1e-3,
    "Å": 1e-4,
    "angstrom": 1e-4,
}
#: the unit segloop writes on its stores' spatial axes
STORE_UNIT = "micrometer"


def um_per_unit(unit: str | None, value: float | str | None) -> float | None:
    """``value`` (one pixel's size in ``unit``) in µm; None when either is missing, the
    unit is not a length (pixels, inches of a screen) or the size is not positive."""
    if unit is None or value is None or unit not in _UM:
        return None
    try:
        um = float(value) * _UM[unit]
    except ValueError:
        return None
    return um if 0 < um < float("inf") else None


#: px/inch below which a resolution tag is a screen's or a printer's (72, 96, 300 dpi, in
#: inches or centimetres: what image editors write by default), not a microscope's
#: (1000 px/inch = 25.4 µm/px)
MIN_PPI = 1000


def from_ppi(y: float, x: float) -> tuple[float, float] | None:
    """µm/px (y, x) from pixels per inch, None below ``MIN_PPI``."""
    return (25400 / y, 25400 / x) if min(y, x) >= MIN_PPI else None

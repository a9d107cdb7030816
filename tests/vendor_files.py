"""Small whole-slide files in the vendors' layouts, written by tifffile's TIFF writer.

Each follows what the format's readers (tifffile, OpenSlide) look for: which IFDs hold
which level, the vendor's ImageDescription / XML / private tags and where the pixel size
is stated. Pixels are random (seeded) but smooth enough for JPEG to look like an image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from scipy.ndimage import zoom

TILE = 256


def slide_pixels(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8: coarse random colours, smoothly upsampled (JPEG-friendly)."""
    coarse = np.random.default_rng(seed).integers(40, 230, (height // 16 + 2, width // 16 + 2, 3))
    return np.clip(zoom(coarse.astype(np.float32), (16, 16, 1), order=1), 0, 255).astype(np.uint8)[
        :height, :width
    ]


def pyramid(img: np.ndarray, factors: tuple[int, ...]) -> list[np.ndarray]:
    """``img`` subsampled by each factor (level 0 = factor 1)."""
    return [img[::f, ::f] for f in factors]


def write_svs(
    path: Path, img: np.ndarray, mpp: float, compression: str | int = "jpeg"
) -> list[np.ndarray]:
    """Aperio SVS: baseline (tiled), thumbnail (stripped), 4× pyramid levels (tiled), label
    and macro (subfiletype 1 and 9); "Aperio Image Library …|MPP = …" descriptions.
    Returns the levels as written."""
    h, w = img.shape[:2]
    levels = pyramid(img, (1, 4))
    head = f"Aperio Image Library v12.0.15\r\n{w}x{h} [0,0 {w}x{h}] ({TILE}x{TILE})"
    meta = f"|AppMag = 40|StripeWidth = 2040|ScanScope ID = SS1234|MPP = {mpp}"
    tiled = dict(tile=(TILE, TILE), compression=compression, photometric="rgb")
    with tifffile.TiffWriter(path, shaped=False) as tw:
        tw.write(levels[0], description=f"{head} JPEG/RGB Q=70{meta}", **tiled)
        thumb = img[::8, ::8]
        tw.write(
            thumb,
            description=f"{head} -> {thumb.shape[1]}x{thumb.shape[0]} - {meta}",
            photometric="rgb",
            compression="jpeg",
        )
        for lv in levels[1:]:
            desc = f"{head} -> {lv.shape[1]}x{lv.shape[0]} - {meta}"
            tw.write(lv, description=desc, **tiled)
        tw.write(img[:64, :96], subfiletype=1, photometric="rgb", compression="lzw",
                 description=f"Aperio Image Library v12.0.15\r\nlabel {96}x{64}")  # fmt: skip
        tw.write(img[::4, ::4][:100, :150], subfiletype=9, photometric="rgb", compression="jpeg",
                 description=f"Aperio Image Library v12.0.15\r\nmacro {150}x{100}")  # fmt: skip
    return levels


def write_ndpi(path: Path, img: np.ndarray, mpp: float) -> list[np.ndarray]:
    """Hamamatsu NDPI: one IFD per level (×1, ×2, ×4), each one JPEG strip, the NDPI
    private tags (65420 format flag, 65421 source lens = magnification, 65422/65423 slide
    offsets, 65424 focal plane), Make/Model, and the pixel size as XResolution in cm
    (ResolutionUnit 3), as NDP.scan writes it; then a macro (source lens −1)."""
    levels = pyramid(img, (1, 2, 4))
    ndpi = lambda lens: [  # noqa: E731
        (65420, "I", 1, 1, True),
        (65421, "f", 1, lens, True),
        (65422, "i", 1, 0, True),
        (65423, "i", 1, 0, True),
        (65424, "i", 1, 0, True),
    ]
    with tifffile.TiffWriter(path, shaped=False) as tw:
        for k, lv in enumerate(levels):
            ppcm = 1e4 / (mpp * 2**k)
            tw.write(
                lv,
                photometric="rgb",
                compression="jpeg",
                rowsperstrip=lv.shape[0],
                resolution=(ppcm, ppcm),
                resolutionunit="CENTIMETER",
                software="NDP.scan 3.2.4",
                extratags=[
                    (271, "s", 0, "Hamamatsu", True),
                    (272, "s", 0, "C13210", True),
                    *ndpi(40.0 / 2**k),
                ],
            )
        macro = img[:90, :120]  # not half a level's size: not taken for a pyramid level
        tw.write(macro, photometric="rgb", compression="jpeg", rowsperstrip=macro.shape[0],
                 extratags=[(271, "s", 0, "Hamamatsu", True), *ndpi(-1.0)])  # fmt: skip
    return levels


_SCN_IMAGE = """
    <image name="{name}" uuid="urn:uuid:00000000-0000-0000-0000-00000000000{i}">
      <creationDate>2026-12-01T10:00:00.00Z</creationDate>
      <device model="Leica SCN400;Leica SCN" version="1.5.1.10864 2012/05/10 13:29:07;1.5.1.10804"/>
      <pixels sizeX="{w}" sizeY="{h}">{dims}
      </pixels>
      <view sizeX="{vw}" sizeY="{vh}" offsetX="{ox}" offsetY="0" spacingZ="0"/>
      <scanSettings>
        <objectiveSettings><objective>{objective}</objective></objectiveSettings>
        <illuminationSettings>
          <numericalAperture>0.7</numericalAperture>
          <illuminationSource>brightfield</illuminationSource>
        </illuminationSettings>
      </scanSettings>
    </image>"""


def write_scn(path: Path, img: np.ndarray, mpp: float) -> list[np.ndarray]:
    """Leica SCN: BigTIFF whose first ImageDescription is the SCN XML: one collection (the
    slide), a macro image listed first whose view covers the whole collection, then the
    main image with levels ×1, ×4; every level an IFD of its own, tiled. The pixel size is
    the main image's ``view`` size (nm) over its pixel size."""
    h, w = img.shape[:2]
    levels = pyramid(img, (1, 4))
    macro = img[:80, :120]
    macro_nm = 20_000  # 20 µm/px: the whole 2.4 × 1.6 mm slide area in the macro image
    cw, ch = macro.shape[1] * macro_nm, macro.shape[0] * macro_nm

    def dims(lvs: list[np.ndarray], first_ifd: int) -> str:
        return "".join(
            f'\n        <dimension sizeX="{lv.shape[1]}" sizeY="{lv.shape[0]}" r="{r}" '
            f'ifd="{first_ifd + r}"/>'
            for r, lv in enumerate(lvs)
        )

    images = _SCN_IMAGE.format(
        name="macro", i=1, w=macro.shape[1], h=macro.shape[0], dims=dims([macro], 0),
        vw=cw, vh=ch, ox=0, objective="0.615",
    ) + _SCN_IMAGE.format(
        name="main", i=2, w=w, h=h, dims=dims(levels, 1), vw=round(w * mpp * 1000),
        vh=round(h * mpp * 1000), ox=400_000, objective="40",
    )  # fmt: skip
    xml = (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<scn xmlns="http://www.leica-microsystems.com/scn/2010/10/01">\n'
        '  <collection name="slide" uuid="urn:uuid:00000000-0000-0000-0000-000000000000" '
        f'sizeX="{cw}" sizeY="{ch}">\n'
        f"    <barcode>c2VnbG9vcA==</barcode>{images}\n  </collection>\n</scn>\n"
    )
    tiled = dict(tile=(TILE, TILE), compression="jpeg", photometric="rgb")
    with tifffile.TiffWriter(path, bigtiff=True, shaped=False) as tw:
        tw.write(macro, description=xml, tile=(64, 64), compression="jpeg", photometric="rgb")
        for lv in levels:
            tw.write(lv, description="Leica SCN", **tiled)
    return levels


_BIF_ISCAN = """<?xml version="1.0" encoding="utf-8"?>
<iScan BuildVersion="3.3.1.1" CaptureDevice="VENTANA DP 200" Magnification="40"
 ScanRes="{mpp}" UnitNumber="DP200-0001" Z-layers="1"/>"""

#: level 0's XMP: one scanned area at the origin whose tiles join without overlap (tiles
#: are numbered from 1, serpentine from the bottom row: tile 2·cols is above tile 1)
_BIF_ENCODE = """<?xml version="1.0" encoding="utf-8"?>
<EncodeInfo Ver="2">
 <SlideStitchInfo>
  <ImageInfo AOIScanned="1" AOIIndex="0" Width="{tile}" Height="{tile}" NumRows="{rows}"
   NumCols="{cols}" Pos-X="0" Pos-Y="0">
   <TileJointInfo FlagJoined="1" Direction="RIGHT" Tile1="1" Tile2="2" OverlapX="0"
    OverlapY="0" Confidence="100"/>
   <TileJointInfo FlagJoined="1" Direction="UP" Tile1="1" Tile2="{above}" OverlapX="0"
    OverlapY="0" Confidence="100"/>
  </ImageInfo>
 </SlideStitchInfo>
 <AoiOrigin><AOI0 OriginX="0" OriginY="0"/></AoiOrigin>
</EncodeInfo>"""


def write_bif(path: Path, img: np.ndarray, mpp: float) -> list[np.ndarray]:
    """Ventana / Roche BIF: BigTIFF with a "Label Image" and a "Thumbnail" IFD, then
    "level=k mag=… quality=90" IFDs (×1, ×2, ×4), tiled JPEG. The XMP tag (700) of the
    first IFD holds ``<iScan … ScanRes=µm/px>``, level 0's the ``EncodeInfo`` tile layout."""
    levels = pyramid(img, (1, 2, 4))
    iscan = _BIF_ISCAN.format(mpp=mpp).encode()
    rows, cols = (-(-n // TILE) for n in img.shape[:2])
    encode = _BIF_ENCODE.format(tile=TILE, rows=rows, cols=cols, above=2 * cols).encode()
    common = dict(software="ScanOutputManager 1.1.0.15854", photometric="rgb")
    with tifffile.TiffWriter(path, bigtiff=True, shaped=False) as tw:
        tw.write(img[:64, :96], description="Label Image", compression="lzw",
                 extratags=[(700, "B", len(iscan), iscan, True)], **common)  # fmt: skip
        tw.write(img[::8, ::8], description="Thumbnail", compression="jpeg", **common)
        for k, lv in enumerate(levels):
            tags = [(700, "B", len(encode), encode, True)] if k == 0 else []
            tw.write(lv, description=f"level={k} mag={40 >> k} quality=90", tile=(TILE, TILE),
                     compression="jpeg", extratags=tags, **common)  # fmt: skip
    return levels


def write_dicom(folder: Path, img: np.ndarray, mpp: float) -> list[np.ndarray]:
    """DICOM VL Whole Slide Microscopy by wsidicom's own writer (``WsiDicom.save``):
    levels ×1, ×2 in 128² JPEG frames, Pixel Spacing = ``mpp``. wsidicom writes from an
    opened slide (a ``Source``); this one hands it the levels as in-memory tiles."""
    import copy

    from pydicom.uid import generate_uid
    from wsidicom import WsiDicom
    from wsidicom.geometry import Point, Size, SizeMm
    from wsidicom.instance import NumpyImageData, WsiInstance
    from wsidicom.metadata import (
        Equipment,
        Image,
        Label,
        Patient,
        Pyramid,
        Series,
        Slide,
        Study,
        WsiMetadata,
    )
    from wsidicom.metadata.image import ImageType
    from wsidicom.metadata.sample import SlideSample
    from wsidicom.metadata.schema.dicom import WsiMetadataDicomSchema
    from wsidicom.source import Source

    tile = 128

    class TiledLevel(NumpyImageData):
        """One level as JPEG-encoded ``tile``² frames (edge frames padded white)."""

        def __init__(self, array: np.ndarray, level_mpp: float) -> None:
            super().__init__(array)
            self._mpp = level_mpp

        @property
        def tile_size(self) -> Size:
            return Size(tile, tile)

        @property
        def pixel_spacing(self) -> SizeMm:
            return SizeMm(self._mpp / 1000, self._mpp / 1000)

        def get_decoded_tile(self, tile_point: Point, z, path, cache=True) -> np.ndarray:
            y, x = tile_point.y * tile, tile_point.x * tile
            out = np.full((tile, tile, 3), 255, np.uint8)
            part = self._pixels[y : y + tile, x : x + tile]
            out[: part.shape[0], : part.shape[1]] = part
            return out

        def get_encoded_tile(self, tile_point: Point, z, path) -> bytes:
            return self.encoder.encode(self.get_decoded_tile(tile_point, z, path))

    class Levels(Source):
        def __init__(self, levels: list[np.ndarray], metadata) -> None:
            self._base = WsiMetadataDicomSchema().dump(metadata, ImageType.VOLUME, True)
            self._levels = [
                WsiInstance.create_instance(
                    TiledLevel(lv, mpp * 2**k), copy.deepcopy(self._base), ImageType.VOLUME, 0
                )
                for k, lv in enumerate(levels)
            ]

        base_dataset = property(lambda self: self._base)
        level_instances = property(lambda self: self._levels)
        label_instances = overview_instances = thumbnail_instances = property(lambda self: [])
        annotation_instances = property(lambda self: [])

        def close(self) -> None:
            pass

    metadata = WsiMetadata(
        Study(uid=generate_uid()), Series(uid=generate_uid()), Patient(), Equipment(),
        Slide(identifier="slide", samples=[SlideSample(identifier="s1", uid=generate_uid())]),
        Pyramid(Image(), [], uid=generate_uid()), Label(),
        frame_of_reference_uid=generate_uid(), dimension_organization_uids=[generate_uid()],
    )  # fmt: skip
    levels = pyramid(img, (1, 2))
    folder.mkdir()
    with WsiDicom(Levels(levels, metadata)) as wsi:
        wsi.save(folder)
    return levels

"""segloop: seam-free segmentation of gigapixel images into OME-Zarr, reviewed in a browser."""

__version__ = "0.1.0"

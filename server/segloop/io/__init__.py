"""Readers (``open_image``) and the OME-Zarr writer (``ome_zarr``)."""

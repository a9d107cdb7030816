"""Tiling, the overlapped stage pipeline, and resume."""

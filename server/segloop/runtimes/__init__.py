"""Inference backends behind one ``Runtime`` interface (see ``base``)."""

from segloop.runtimes.base import RUNTIMES, Runtime, TileRuntime, create_runtime, device_options

__all__ = ["RUNTIMES", "Runtime", "TileRuntime", "create_runtime", "device_options"]

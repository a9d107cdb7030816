"""Inference backends behind one ``Runtime`` interface (see ``base``)."""

from segloop.runtimes.base import RUNTIMES, Runtime, create_runtime

__all__ = ["RUNTIMES", "Runtime", "create_runtime"]

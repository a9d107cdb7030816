"""Triton python backend entry point (see segloop.triton.models)."""

from segloop.triton.models import PostModel as TritonPythonModel  # noqa: F401

"""Folders shipped with segloop: the model repository and the review UI.

A wheel carries them inside the package (``segloop/model_repository``,
``segloop/review_ui``, declared as package data in ``pyproject.toml``); a source
checkout keeps them at the top level, beside ``server/``. One lookup serves both.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path


def shipped(name: str) -> Path:
    """Path of the shipped folder ``name`` (``"model_repository"`` or ``"review_ui"``)."""
    inside = Path(str(files("segloop"))) / name  # installed from a wheel
    if inside.is_dir():
        return inside
    return Path(__file__).resolve().parents[2] / name  # server/segloop/ → checkout root


def model_repository() -> Path:
    """The model repository: ``$SEGLOOP_MODEL_REPOSITORY``, else the shipped one."""
    env = os.environ.get("SEGLOOP_MODEL_REPOSITORY")
    return Path(env) if env else shipped("model_repository")


UI_DIR = shipped("review_ui")
OSD_DIR = UI_DIR / "node_modules" / "openseadragon" / "build" / "openseadragon"

"""Models in a Triton model repository, by name: ``--model NAME|PATH`` → an ONNX file,
the list ``segloop models`` prints, and the names of a model's Triton parts.

A model ``NAME`` is a folder ``NAME/<version>/model.onnx`` (with its card); the newest
version is the one used. The shipped UNet is ``segloop_unet``, served by the ensemble
``segloop``; a model added with ``segloop model add`` is served by ``NAME_tiles``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from segloop.assets import model_repository
from segloop.errors import UserError
from segloop.model.card import model_mpp, read_card

SHIPPED = "segloop_unet"
#: a model name: a Triton model name that is also a safe folder name
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class TritonNames:
    """The four Triton models that serve one network (uint8 windows in, masks out)."""

    ensemble: str
    pre: str
    net: str
    post: str


def triton_names(name: str) -> TritonNames:
    """Triton model names for the network ``name`` (the shipped one keeps its names)."""
    if name == SHIPPED:
        return TritonNames("segloop", "segloop_pre", SHIPPED, "segloop_post")
    return TritonNames(f"{name}_tiles", f"{name}_pre", name, f"{name}_post")


def repository(explicit: Path | None = None) -> Path:
    """``explicit`` (``--repository``), else ``$SEGLOOP_MODEL_REPOSITORY``, else the shipped one."""
    return explicit if explicit is not None else model_repository()


def versions(folder: Path) -> list[int]:
    """Version numbers under a model folder that hold a model.onnx, ascending."""
    found = (p for p in folder.glob("[0-9]*") if p.name.isdigit())
    return sorted(int(p.name) for p in found if (p / "model.onnx").exists())


def newest(repo: Path, name: str) -> Path:
    """model.onnx of the newest version of ``name`` in ``repo``."""
    found = versions(repo / name)
    if not found:
        hint = "run `segloop train`" if name == SHIPPED else "add one with `segloop model add`"
        raise UserError(f"no model found under {repo}/{name}/<version>/model.onnx; {hint}")
    return repo / name / str(found[-1]) / "model.onnx"


def resolve_model(model: Path | str | None, repo: Path | None = None) -> Path:
    """The ONNX file for ``--model``: None → the newest shipped UNet; an existing file →
    itself; a name → its newest version in the repository."""
    repo = repository(repo)
    if model is None:
        return newest(repo, SHIPPED)
    path = Path(model)
    if path.is_file():
        return path
    name = str(model)
    if NAME_RE.fullmatch(name) and (repo / name).is_dir():
        return newest(repo, name)
    raise UserError(
        f"--model {model}: no such file, and no model {name!r} in {repo} "
        "(`segloop models` lists them)"
    )


def list_models(repo: Path | None = None) -> list[dict]:
    """One row per model of the repository: name, versions, and its newest card's
    classes, halo, mpp, input channels and output kind (``card: false`` if it has none)."""
    repo = repository(repo)
    rows = []
    for folder in sorted(p for p in repo.iterdir() if p.is_dir()) if repo.is_dir() else []:
        found = versions(folder)
        if not found:
            continue
        row = {"name": folder.name, "versions": found, "path": str(newest(repo, folder.name))}
        try:
            card = read_card(Path(row["path"]))
        except UserError:
            rows.append({**row, "card": False})
            continue
        rows.append(
            {
                **row,
                "card": True,
                "classes": card["classes"],
                "halo": card["halo"],
                "multiple_of": card["input"]["multiple_of"],
                "channels": card["input"].get("channels", "RGB"),
                "output": card.get("output", {}).get("kind", "logits"),
                "mpp": model_mpp(card),
            }
        )
    return rows

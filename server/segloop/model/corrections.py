"""Read a ``segloop export-corrections`` folder as a PyTorch dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from segloop.errors import UserError
from segloop.review.db import EXPERTS
from segloop.review.export import FORMAT, FORMAT_VERSION, INDEX

IGNORE = 255  # target value of pixels no human vouched for (CrossEntropyLoss ignore_index)


def read_index(folder: Path) -> dict:
    """The export's ``index.json``, checked to be a complete segloop export."""
    path = folder / INDEX
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UserError(
            f"{folder} is not a finished corrections export (no readable {INDEX}); "
            "run `segloop export-corrections` first"
        ) from None
    if index.get("format") != FORMAT or index.get("version") != FORMAT_VERSION:
        raise UserError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} index")
    return index


class CorrectionsDataset(Dataset):
    """One item per exported tile: ``(rgb, target)``.

    rgb: (h, w, 3) uint8 (gray is repeated to RGB; uint16 scaled to 8 bits);
    target: (h, w) int64 corrected classes, ``IGNORE`` where ``ignore`` is set.
    """

    def __init__(self, folder: Path, approved_only: bool = False) -> None:
        self.folder = folder
        self.index = read_index(folder)
        self.items = [
            it for it in self.index["items"] if not approved_only or it["role"] in EXPERTS
        ]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def weights(self) -> np.ndarray:
        """(n,) float64 sampling probability of each tile (its ``weight``, 1 when the
        export gave none; ``segloop.learn.trust``), summing to 1."""
        w = np.array([it.get("weight", 1.0) for it in self.items], np.float64)
        return w / w.sum()

    def subset(self, keep: list[int]) -> CorrectionsDataset:
        """The same export, only the items at the indices ``keep``."""
        out = CorrectionsDataset.__new__(CorrectionsDataset)
        out.folder, out.index = self.folder, self.index
        out.items = [self.items[i] for i in keep]
        return out

    def __getitem__(self, i: int) -> tuple[np.ndarray, torch.Tensor]:
        with np.load(self.folder / self.items[i]["file"]) as z:
            image, corrected, ignore = z["image"], z["corrected"], z["ignore"]
        if image.dtype == np.uint16:
            image = (image >> 8).astype(np.uint8)
        if image.shape[-1] == 1:
            image = np.repeat(image, 3, axis=-1)
        target = torch.from_numpy(corrected.astype(np.int64))
        target[torch.from_numpy(ignore)] = IGNORE
        return image[..., :3], target

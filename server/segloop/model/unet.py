"""Small fully convolutional UNet (PyTorch).

Input: (N, 3, H, W) float32, normalised as ``(rgb/255 - MEAN) / STD``; H and W multiples
of ``DOWNSAMPLE``. Output: (N, n_classes, H, W) float32 logits. No normalisation layers,
so the ONNX initializers map 1:1 onto ``state_dict`` names (one set of weights for all
runtimes).
"""

from __future__ import annotations

import torch
from torch import nn

WIDTHS = (16, 32, 64, 128)
DOWNSAMPLE = 2 ** (len(WIDTHS) - 1)
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    def __init__(self, n_classes: int = 3, widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        self.down = nn.ModuleList()
        cin = 3
        for w in widths:
            self.down.append(_block(cin, w))
            cin = w
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(cin, w, 2, stride=2))
            self.dec.append(_block(2 * w, w))
            cin = w
        self.head = nn.Conv2d(cin, n_classes, 1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        skips.pop()
        for up, dec in zip(self.up, self.dec, strict=True):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


def receptive_radius(model: nn.Module, size: int = 320) -> int:
    """Measured receptive-field radius (px): how far an input change reaches an output pixel
    (0 for a network whose output no input reaches, e.g. one a bad fine-tune killed)."""
    x = torch.randn(1, 3, size, size, dtype=torch.float64, requires_grad=True)
    m = model.double()
    try:
        c = size // 2
        m(x)[0, :, c, c].sum().backward()
    finally:
        model.float()
    g = x.grad.abs().sum(dim=(0, 1))
    ys, xs = torch.nonzero(g, as_tuple=True)
    if ys.numel() == 0:
        return 0
    return int(max(c - ys.min(), ys.max() - c, c - xs.min(), xs.max() - c))

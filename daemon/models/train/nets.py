"""The networks of the view classifier and the needle-tip model (torch)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from daemon.models.train.common import conv_block


class ViewNet(nn.Module):
    """A stride-2 stem, four stages of two 3x3 conv + BatchNorm + ReLU and max-pooling
    (16..128 channels), global average and max pooling, dropout, ``classes`` logits."""

    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        stages: list[nn.Module] = [
            nn.Conv2d(1, 16, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
        ]
        for cin, cout in ((16, 32), (32, 64), (64, 96), (96, 128)):
            stages += [conv_block(2, cin, cout), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(256, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        out: torch.Tensor = self.head(torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1))
        return out


STRIDE = 4  # TipNet's maps are a quarter of its input's side


class TipNet(nn.Module):
    """An encoder-decoder: a stride-2 stem, four levels of two 3x3 conv + BatchNorm + ReLU
    with max-pooling down to 1/32 (24..128 channels), nearest upsampling with skip
    concatenation back to 1/4; three maps there: the tip's heatmap (logits) and its
    offset (x, y) from each cell's centre, in cells (CenterNet's keypoint head)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 16, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
        )
        widths = (24, 48, 64, 96)
        self.down = nn.ModuleList()
        cin = 16
        for c in widths:
            self.down.append(conv_block(2, cin, c))
            cin = c
        self.bottom = conv_block(2, cin, 128)
        self.up = nn.ModuleList()
        cin = 128
        for c in reversed(widths[1:]):  # back to the 1/4 level (widths[1])
            self.up.append(conv_block(2, cin + c, c))
            cin = c
        self.head = nn.Sequential(
            nn.Conv2d(cin, 32, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(32, 3, 1)
        )
        with torch.no_grad():  # start every cell at a tip probability of 0.01 (CenterNet)
            self.head[-1].bias[0] = -4.6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottom(x)
        for block, skip in zip(self.up, reversed(skips[1:]), strict=True):
            x = block(torch.cat([F.interpolate(x, scale_factor=2.0, mode="nearest"), skip], 1))
        out: torch.Tensor = self.head(x)
        return out


class TipPoint(nn.Module):
    """TipNet as exported: (N, 1, 3) = the best cell's x, y (its centre plus the offset)
    normalised to the input's extent, and its score (sigmoid of the heatmap)."""

    def __init__(self, net: TipNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.net(x)
        h, w = maps.shape[2], maps.shape[3]
        score, idx = maps[:, 0].flatten(1).max(1)
        offset = maps[:, 1:3].flatten(2).gather(2, idx.view(-1, 1, 1).expand(-1, 2, 1))[:, :, 0]
        col = torch.remainder(idx, w).float()
        row = torch.div(idx, w, rounding_mode="floor").float()
        px = (col + offset[:, 0] + 0.5) / w
        py = (row + offset[:, 1] + 0.5) / h
        return torch.stack([px, py, score.sigmoid()], 1)[:, None, :]

"""small_cnn: (conv2d -> BatchNorm2d -> ReLU -> max-pool) x 2, global average pool, linear head.

BatchNorm is the interesting part: in eval mode it folds to a per-channel affine; in train mode it computes
batch statistics and mutates its running buffers, which a backend must write back.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .registry import ZooEntry


@dataclass(frozen=True)
class CNNConfig:
    batch: int
    channels: int  # input channels
    size: int  # input height = width
    widths: tuple  # output channels of the two conv blocks
    classes: int


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False),  # no bias: BatchNorm follows
        nn.BatchNorm2d(cout),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class SmallCNN(nn.Module):
    def __init__(self, cfg: CNNConfig):
        super().__init__()
        w1, w2 = cfg.widths
        self.features = nn.Sequential(conv_block(cfg.channels, w1), conv_block(w1, w2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(w2, cfg.classes)
        self._randomise_running_stats()

    def _randomise_running_stats(self) -> None:
        # Fresh running stats (mean 0, var 1) make eval-mode BatchNorm an identity; avoid that.
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.normal_(0.0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


def _inputs(cfg: CNNConfig, gen: torch.Generator) -> tuple:
    return (torch.randn(cfg.batch, cfg.channels, cfg.size, cfg.size, generator=gen),)


ENTRY = ZooEntry(
    name="small_cnn",
    description="CNN: (conv3x3, BatchNorm2d, ReLU, max-pool) x 2, global average pool, linear head",
    trainable=True,
    configs={
        "small": CNNConfig(batch=2, channels=3, size=16, widths=(8, 16), classes=10),
        "bench": CNNConfig(batch=64, channels=3, size=224, widths=(64, 128), classes=1000),
    },
    build=SmallCNN,
    inputs=_inputs,
)

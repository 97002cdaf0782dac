"""The small model the influence tests score: a tanh body and a linear head named `head`."""

from __future__ import annotations

import torch
from torch import nn


class HeadNet(nn.Module):
    def __init__(self, n_in: int = 5, hidden: int = 6, n_out: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

"""Layers shared by the project's models."""

from __future__ import annotations

import torch
import torch.nn as nn


class FeedForward(nn.Module):
    """Position-wise FFN with a post-LayerNorm residual (TiM4Rec, Mamba4Rec, LRURec).

    out = LayerNorm(Dropout(W2 Dropout(act(W1 x))) + x), W1: d -> 4d, W2: 4d -> d.
    """

    def __init__(
        self, d_model: int, dropout: float, activation: nn.Module, eps: float = 1e-12
    ) -> None:
        super().__init__()
        self.w_1 = nn.Linear(d_model, 4 * d_model)
        self.w_2 = nn.Linear(4 * d_model, d_model)
        self.activation = activation
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d_model, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, d) -> (B, L, d)
        hidden = self.w_2(self.dropout(self.activation(self.w_1(x))))
        return self.layer_norm(self.dropout(hidden) + x)

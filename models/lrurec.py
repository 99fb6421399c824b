"""LRURec: linear recurrent units for sequential recommendation.

Reference:
    Zhenrui Yue, Yueqi Wang, Zhankui He, Huimin Zeng, Julian McAuley, Dong Wang.
    "Linear Recurrent Units for Sequential Recommendation." WSDM 2024.
    (The LRU itself: Orvieto et al., "Resurrecting Recurrent Neural Networks for Long
    Sequences", ICML 2023.)

Each layer is an LRU, a complex diagonal linear recurrence

    h_t = lambda * h_{t-1} + gamma * (W_in x_t),     lambda = exp(-exp(nu_log) + i exp(theta_log))
    y_t = Re(W_out h_t)

with the eigenvalues initialised uniformly on a ring r_min <= |lambda| <= r_max with phase
in [0, max_phase], and the input normalised by gamma = sqrt(1 - |lambda|^2) (stored as
log, learnable). The recurrence runs as a parallel (log-depth) scan
(`models.selective_scan.linear_scan`). Dropout, residual and LayerNorm follow the LRU,
then a position-wise GELU feed-forward network (d -> 4d -> d) with residual and
LayerNorm. Items: Embedding -> LayerNorm -> Dropout. Scores: the last real position's
state against the tied item embeddings plus a per-item bias; full softmax cross-entropy.

W_in (complex, d -> d) is stored as a real Linear(d, 2d) giving real and imaginary parts;
Re(W_out h) as a real Linear(2d, d) on [Re h, Im h]: the same functions.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from recbole.model.abstract_recommender import SequentialRecommender

from models.layers import Dropout, FeedForward
from models.selective_scan import linear_scan


class LRULayer(nn.Module):
    """Linear recurrent unit with residual and LayerNorm: (B, L, d) -> (B, L, d)."""

    def __init__(
        self, d_model: int, dropout: float, r_min: float, r_max: float, max_phase: float
    ) -> None:
        super().__init__()
        if not 0.0 <= r_min < r_max <= 1.0:
            raise ValueError(f"need 0 <= r_min < r_max <= 1, got r_min={r_min}, r_max={r_max}")
        self.d_model = d_model
        # Ring init: |lambda|^2 uniform in [r_min^2, r_max^2], phase uniform in [0, max_phase].
        u1, u2 = torch.rand(d_model), torch.rand(d_model)
        nu = -0.5 * torch.log(u1 * (r_max**2 - r_min**2) + r_min**2)  # -log|lambda|
        theta = (max_phase * u2).clamp(min=1e-6)  # log needs > 0
        self.nu_log = nn.Parameter(torch.log(nu))
        self.theta_log = nn.Parameter(torch.log(theta))
        self.gamma_log = nn.Parameter(0.5 * torch.log(-torch.expm1(-2 * nu)))  # sqrt(1-|l|^2)
        self.in_proj = nn.Linear(d_model, 2 * d_model)  # real and imaginary parts of W_in x
        self.out_proj = nn.Linear(2 * d_model, d_model)  # Re(W_out h) from [Re h, Im h]
        self.dropout = Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d_model)

    def eigenvalues(self) -> torch.Tensor:
        """lambda (d,), complex."""
        return torch.exp(torch.complex(-torch.exp(self.nu_log), torch.exp(self.theta_log)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        re, im = self.in_proj(x).chunk(2, dim=-1)  # (B, L, d) each
        dtype = torch.promote_types(x.dtype, torch.float32)  # complex64 at least
        drive = torch.complex(re.to(dtype), im.to(dtype)) * torch.exp(self.gamma_log.to(dtype))
        states = linear_scan(self.eigenvalues()[None, None, :], drive, dim=1)  # (B, L, d) complex
        y = self.out_proj(torch.cat([states.real, states.imag], dim=-1).to(x.dtype))
        return self.layer_norm(self.dropout(y) + x)


class LRUBlock(nn.Module):
    def __init__(self, d_model: int, dropout: float, **lru_kwargs) -> None:
        super().__init__()
        self.lru = LRULayer(d_model, dropout, **lru_kwargs)
        self.ffn = FeedForward(d_model, dropout, nn.GELU(), eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.lru(x))


class LRURec(SequentialRecommender):
    """LRURec as a RecBole sequential recommender (full softmax cross-entropy)."""

    def __init__(self, config, dataset) -> None:
        super().__init__(config, dataset)
        self.hidden_size = config["hidden_size"]
        self.num_layers = config["num_layers"]
        self.dropout_prob = config["dropout_prob"]
        self.initializer_range = config["initializer_range"]
        if config["loss_type"] != "CE":
            raise ValueError(f"LRURec trains with loss_type: CE, got {config['loss_type']!r}")

        self.item_embedding = nn.Embedding(self.n_items, self.hidden_size, padding_idx=0)
        self.layer_norm = nn.LayerNorm(self.hidden_size)
        self.emb_dropout = Dropout(self.dropout_prob)
        self.layers = nn.ModuleList(
            LRUBlock(
                self.hidden_size,
                self.dropout_prob,
                r_min=config["r_min"],
                r_max=config["r_max"],
                max_phase=config["max_phase"],
            )
            for _ in range(self.num_layers)
        )
        self.item_bias = nn.Parameter(torch.zeros(self.n_items))
        self.loss_fct = nn.CrossEntropyLoss()
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # Truncated normal (2 std) for weights, as in LRURec; the LRU's own parameters keep
        # the ring initialisation.
        std = self.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(module.weight, mean=0.0, std=std, a=-2 * std, b=2 * std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        """Histories (B, L) -> user vectors (B, d)."""
        hidden = self.emb_dropout(self.layer_norm(self.item_embedding(item_seq)))  # (B, L, d)
        for layer in self.layers:
            hidden = layer(hidden)
        return self.gather_indexes(hidden, item_seq_len - 1)  # (B, d)

    def _logits(self, interaction) -> torch.Tensor:
        user = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return user @ self.item_embedding.weight.T + self.item_bias  # (B, V)

    def calculate_loss(self, interaction) -> torch.Tensor:
        return self.loss_fct(self._logits(interaction), interaction[self.POS_ITEM_ID])

    def predict(self, interaction) -> torch.Tensor:
        user = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        items = interaction[self.ITEM_ID]
        return (user * self.item_embedding(items)).sum(dim=-1) + self.item_bias[items]

    def full_sort_predict(self, interaction) -> torch.Tensor:
        return self._logits(interaction)

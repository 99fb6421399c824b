"""TiSASRec: time interval aware self-attention for sequential recommendation.

Reference:
    Jiacheng Li, Yujing Wang, Julian McAuley. "Time Interval Aware Self-Attention for
    Sequential Recommendation." WSDM 2020.

Per user, the time interval between interactions i and j is |t_i - t_j| in units of the
user's smallest nonzero gap (rounded, so the shortest gap is 1), clipped at `time_span`:
r_ij in {0, ..., time_span}. Interval embeddings (one table for keys, one for values) and
absolute position embeddings (again for keys and values) enter the attention:

    e_ij  = q_i . (k_j + p^K_j + r^K_ij) / sqrt(d_h)      causal: j <= i
    z_i   = sum_j softmax_j(e_ij) (v_j + p^V_j + r^V_ij)

Each layer: queries are LayerNorm(x), keys and values x; x <- q + attention; then
LayerNorm and a point-wise ReLU feed-forward network with a residual; a last LayerNorm.
Padding positions are zeroed after every layer. The user vector is the last real
position's state, scored against the tied item embeddings with full softmax
cross-entropy (the paper trains with sampled binary cross-entropy; this codebase trains
every model with CE).

The "user's interval scale" is computed from the history the model sees (the last
`MAX_ITEM_LIST_LENGTH` items before the target), read from the `timestamp_list` field.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from recbole.model.abstract_recommender import SequentialRecommender

from models.layers import Dropout


def time_intervals(timestamps: torch.Tensor, seq_len: torch.Tensor, time_span: int) -> torch.Tensor:
    """Timestamps (B, L), right-padded, -> clipped scaled intervals r (B, L, L), int64.

    scale_u = min nonzero |t_{i+1} - t_i| over the real prefix (1 when all gaps are 0);
    s_i = round((t_i - t_0) / scale_u); r_ij = min(|s_i - s_j|, time_span); 0 on padding.
    """
    # RecBole hands timestamps over as float32: unix seconds to 64-128 s resolution, so the
    # smallest gap is at least one such step. float64 keeps the arithmetic below exact.
    t = timestamps.double()
    positions = torch.arange(t.size(1), device=t.device)
    real = positions[None, :] < seq_len[:, None]  # (B, L)
    gaps = (t[:, 1:] - t[:, :-1]).abs()  # (B, L-1)
    gaps = gaps.masked_fill(~real[:, 1:] | (gaps == 0), math.inf)
    scale = (
        gaps.min(dim=1, keepdim=True).values
        if gaps.size(1)
        else t.new_full((t.size(0), 1), math.inf)
    )
    scale = torch.where(torch.isinf(scale), torch.ones_like(scale), scale)  # (B, 1)
    steps = torch.round((t - t[:, :1]) / scale).masked_fill(~real, 0)  # (B, L)
    intervals = (steps[:, :, None] - steps[:, None, :]).abs().clamp(max=time_span)
    pair_real = real[:, :, None] & real[:, None, :]
    return intervals.masked_fill(~pair_real, 0).long()  # (B, L, L)


class TimeIntervalAttention(nn.Module):
    """Multi-head self-attention with interval and position embeddings in keys and values."""

    def __init__(self, hidden_size: int, n_heads: int, attn_dropout: float) -> None:
        super().__init__()
        if hidden_size % n_heads:
            raise ValueError(f"n_heads ({n_heads}) must divide hidden_size ({hidden_size})")
        self.n_heads = n_heads
        self.head_dim = hidden_size // n_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.dropout = Dropout(attn_dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (..., L, d) -> (..., h, L, d_h)
        return x.unflatten(-1, (self.n_heads, self.head_dim)).transpose(-3, -2)

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        pos_k: torch.Tensor,
        pos_v: torch.Tensor,
        time_k: torch.Tensor,
        time_v: torch.Tensor,
        allowed: torch.Tensor,
    ) -> torch.Tensor:
        """queries, keys (B, L, d); pos_k, pos_v (L, d); time_k, time_v (B, L, L, d);
        allowed (B, L, L) bool, True where query i may attend to key j. -> (B, L, d)."""
        q = self._heads(self.query(queries))  # (B, h, L, d_h)
        k = self._heads(self.key(keys))
        v = self._heads(self.value(keys))
        pk, pv = self._heads(pos_k), self._heads(pos_v)  # (h, L, d_h)
        tk = time_k.unflatten(-1, (self.n_heads, self.head_dim))  # (B, L, L, h, d_h)
        tv = time_v.unflatten(-1, (self.n_heads, self.head_dim))

        scores = q @ k.transpose(-1, -2) + q @ pk.transpose(-1, -2)  # (B, h, L, L)
        scores = scores + torch.einsum("bhid,bijhd->bhij", q, tk)
        scores = scores / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
        probs = self.dropout(torch.softmax(scores, dim=-1))  # (B, h, L, L)

        out = probs @ v + probs @ pv + torch.einsum("bhij,bijhd->bhid", probs, tv)
        return out.transpose(1, 2).flatten(-2)  # (B, L, d)


class PointWiseFeedForward(nn.Module):
    """out = x + Dropout(W2 ReLU(Dropout(W1 x))), W1, W2: d -> d."""

    def __init__(self, hidden_size: int, dropout: float) -> None:
        super().__init__()
        self.w_1 = nn.Linear(hidden_size, hidden_size)
        self.w_2 = nn.Linear(hidden_size, hidden_size)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.w_2(torch.relu(self.dropout(self.w_1(x)))))


class TiSASRecLayer(nn.Module):
    def __init__(self, hidden_size: int, n_heads: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.attention = TimeIntervalAttention(hidden_size, n_heads, dropout)
        self.forward_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.feed_forward = PointWiseFeedForward(hidden_size, dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor, **attention_inputs) -> torch.Tensor:
        q = self.attention_norm(x)
        x = q + self.attention(q, x, **attention_inputs)
        return self.feed_forward(self.forward_norm(x)) * keep  # (B, L, d), padding zeroed


class TiSASRec(SequentialRecommender):
    """TiSASRec as a RecBole sequential recommender (full softmax cross-entropy)."""

    def __init__(self, config, dataset) -> None:
        super().__init__(config, dataset)
        self.hidden_size = config["hidden_size"]
        self.num_layers = config["num_layers"]
        self.n_heads = config["n_heads"]
        self.dropout_prob = config["dropout_prob"]
        self.time_span = config["time_span"]
        self.initializer_range = config["initializer_range"]
        if config["loss_type"] != "CE":
            raise ValueError(f"TiSASRec trains with loss_type: CE, got {config['loss_type']!r}")
        self.time_field = config["TIME_FIELD"] + config["LIST_SUFFIX"]

        d, L = self.hidden_size, self.max_seq_length
        self.item_embedding = nn.Embedding(self.n_items, d, padding_idx=0)
        self.pos_k_embedding = nn.Embedding(L, d)
        self.pos_v_embedding = nn.Embedding(L, d)
        self.time_k_embedding = nn.Embedding(self.time_span + 1, d)
        self.time_v_embedding = nn.Embedding(self.time_span + 1, d)
        self.emb_dropout = Dropout(self.dropout_prob)
        self.pos_k_dropout = Dropout(self.dropout_prob)
        self.pos_v_dropout = Dropout(self.dropout_prob)
        self.time_k_dropout = Dropout(self.dropout_prob)
        self.time_v_dropout = Dropout(self.dropout_prob)
        eps = config["layer_norm_eps"]
        self.layers = nn.ModuleList(
            TiSASRecLayer(d, self.n_heads, self.dropout_prob, eps) for _ in range(self.num_layers)
        )
        self.last_norm = nn.LayerNorm(d, eps=eps)
        self.loss_fct = nn.CrossEntropyLoss()
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.initializer_range)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    def forward(
        self, item_seq: torch.Tensor, item_seq_len: torch.Tensor, timestamps: torch.Tensor
    ) -> torch.Tensor:
        """Histories (B, L) and their timestamps (B, L) -> user vectors (B, d)."""
        seq_length = item_seq.size(1)
        keep = (item_seq != 0).unsqueeze(-1).to(self.item_embedding.weight.dtype)  # (B, L, 1)
        x = self.item_embedding(item_seq) * math.sqrt(self.hidden_size)
        x = self.emb_dropout(x) * keep  # (B, L, d)

        positions = torch.arange(seq_length, device=item_seq.device)
        pos_k = self.pos_k_dropout(self.pos_k_embedding(positions))  # (L, d)
        pos_v = self.pos_v_dropout(self.pos_v_embedding(positions))
        intervals = time_intervals(timestamps, item_seq_len, self.time_span)  # (B, L, L)
        time_k = self.time_k_dropout(self.time_k_embedding(intervals))  # (B, L, L, d)
        time_v = self.time_v_dropout(self.time_v_embedding(intervals))

        causal = torch.tril(torch.ones(seq_length, seq_length, dtype=torch.bool, device=x.device))
        allowed = causal[None] & (item_seq != 0)[:, None, :]  # (B, L, L): past, real keys
        for layer in self.layers:
            x = layer(
                x,
                keep,
                pos_k=pos_k,
                pos_v=pos_v,
                time_k=time_k,
                time_v=time_v,
                allowed=allowed,
            )
        return self.gather_indexes(self.last_norm(x), item_seq_len - 1)  # (B, d)

    def _user_vectors(self, interaction) -> torch.Tensor:
        return self.forward(
            interaction[self.ITEM_SEQ],
            interaction[self.ITEM_SEQ_LEN],
            interaction[self.time_field],
        )

    def calculate_loss(self, interaction) -> torch.Tensor:
        logits = self._user_vectors(interaction) @ self.item_embedding.weight.T  # (B, V)
        return self.loss_fct(logits, interaction[self.POS_ITEM_ID])

    def predict(self, interaction) -> torch.Tensor:
        user = self._user_vectors(interaction)  # (B, d)
        return (user * self.item_embedding(interaction[self.ITEM_ID])).sum(dim=-1)

    def full_sort_predict(self, interaction) -> torch.Tensor:
        return self._user_vectors(interaction) @ self.item_embedding.weight.T  # (B, V)

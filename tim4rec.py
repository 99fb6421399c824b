"""TiM4Rec: time-aware structured state space duality for sequential recommendation.

Reference:
    Hao Fan, Mengyi Zhu, Yanrong Hu, Hailin Feng, Zhijie He, Hongjiu Liu, Qingyang Liu.
    "TiM4Rec: An Efficient Sequential Recommendation Model Based on Time-Aware Structured
    State Space Duality Model." Neurocomputing, 2025. arXiv:2409.16182.

A stack of Mamba-2 (SSD) blocks whose step size is modulated by the time gaps between a
user's interactions (ssd.TiSSDBlock), each followed by a position-wise FFN. The user
vector is the hidden state at the last real position; scores are its dot products with
the (tied) item embeddings. ../shared/TIM4REC_SPEC.md is the full specification.

`SSD4Rec` is the same model with the time path switched off (the paper's ablation).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from recbole.model.abstract_recommender import SequentialRecommender

from models.backend import set_triton_autotune
from models.layers import (
    Dropout,
    DropoutAddLayerNorm,
    FeedForward,
    PrefixLayerNorm,
    fuses_bias,
)
from ssd import TiSSDBlock

TIME_ENCODINGS = ("paper", "corrected", "causal")
# Training batches of all-positions mode (pipeline/sequence_batches.py) carry this field:
# indices into the flattened (B * L) positions whose next item is a training target.
POSITION_INDEX = "position_index"


class TiSSDLayer(nn.Module):
    """TiSSD block, LayerNorm(Dropout(block(x)) + x) (no residual with one layer), then the
    FFN. The residual norms run fused on the block's backend; on the Triton backend the
    first one also adds out_proj's bias (`fuses_bias`)."""

    def __init__(
        self, d_model: int, dropout: float, residual: bool, backend: str = "auto", **block_kwargs
    ) -> None:
        super().__init__()
        self.block = TiSSDBlock(d_model=d_model, backend=backend, **block_kwargs)
        self.residual = residual
        self.layer_norm = DropoutAddLayerNorm(d_model, dropout, backend=backend)
        self.ffn = FeedForward(
            d_model,
            dropout,
            nn.Hardswish(),
            backend=backend,
            product_kernel=block_kwargs.get("product_kernel", "triton"),
        )

    def forward(
        self, x: torch.Tensor, time_signal: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        fused = fuses_bias(self.layer_norm.backend, x.device)
        u, time_next = self.block(x, time_signal, out_bias=not fused)  # (B, L, d)
        out_bias = self.block.out_proj.bias if fused else None
        y = self.layer_norm(u, x if self.residual else None, x_bias=out_bias)
        return self.ffn(y), time_next


class TimeGapEncoder(nn.Module):
    """Timestamps (B, L) -> time signal (B, H, L) fed to every TiSSD layer.

    ``"paper"``: gaps on the padded row (the first padding slot sees -t_last, as the
    official model does), Dropout, LayerNorm over L. ``"corrected"``: log1p gaps inside
    the real prefix only, normalised with statistics over real positions, padding zero.
    ``"causal"``: log1p gaps, position i normalised over positions 0..i (PrefixLayerNorm),
    so that, with the block's causal time path, no position sees a later one.
    """

    def __init__(self, max_seq_length: int, nheads: int, dropout: float, encoding: str) -> None:
        super().__init__()
        if encoding not in TIME_ENCODINGS:
            raise ValueError(f"time_encoding must be one of {TIME_ENCODINGS}, got {encoding!r}")
        self.encoding = encoding
        self.nheads = nheads
        self.dropout = Dropout(dropout)
        norm = PrefixLayerNorm if encoding == "causal" else nn.LayerNorm
        self.layer_norm = norm(max_seq_length)

    def forward(self, timestamps: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor:
        timestamps = timestamps.to(self.layer_norm.weight.dtype)
        gaps = torch.zeros_like(timestamps)
        gaps[:, 1:] = timestamps[:, 1:] - timestamps[:, :-1]  # (B, L)
        if self.encoding == "paper":
            signal = self.layer_norm(self.dropout(gaps))
        elif self.encoding == "causal":
            signal = self.dropout(self.layer_norm(torch.log1p(gaps.clamp(min=0))))
        else:
            positions = torch.arange(timestamps.size(1), device=timestamps.device)
            real = positions[None, :] < seq_len[:, None]  # (B, L)
            gaps = torch.log1p(gaps.clamp(min=0)).masked_fill(~real, 0)
            count = real.sum(dim=1, keepdim=True).clamp(min=1)
            mean = gaps.sum(dim=1, keepdim=True) / count
            var = ((gaps - mean).masked_fill(~real, 0) ** 2).sum(dim=1, keepdim=True) / count
            normed = (gaps - mean) * torch.rsqrt(var + self.layer_norm.eps)
            signal = normed * self.layer_norm.weight + self.layer_norm.bias
            signal = self.dropout(signal.masked_fill(~real, 0))
        return signal[:, None, :].expand(-1, self.nheads, -1)  # (B, H, L)


class TiM4Rec(SequentialRecommender):
    """TiM4Rec as a RecBole sequential recommender (full softmax cross-entropy)."""

    def __init__(self, config, dataset) -> None:
        super().__init__(config, dataset)

        self.hidden_size = config["hidden_size"]
        self.num_layers = config["num_layers"]
        self.dropout_prob = config["dropout_prob"]
        self.is_time = self._is_time(config)
        self.is_kai_ming_init = config["is_kai_ming_init"]
        self.loss_type = config["loss_type"]
        if self.loss_type != "CE":
            raise ValueError(f"TiM4Rec trains with loss_type: CE, got {self.loss_type!r}")
        self.time_field = config["TIME_FIELD"] + config["LIST_SUFFIX"]
        set_triton_autotune(config["triton_autotune"] or "pinned")  # process-wide

        self.item_embedding = nn.Embedding(self.n_items, self.hidden_size, padding_idx=0)
        # LayerNorm(Dropout(embedding)), fused on the Triton backend
        self.layer_norm = DropoutAddLayerNorm(
            self.hidden_size, self.dropout_prob, backend=config["ssd_backend"]
        )
        block_kwargs = dict(
            max_seq_length=self.max_seq_length,
            d_state=config["d_state"],
            d_conv=config["d_conv"],
            expand=config["expand"],
            head_dim=config["head_dim"],
            chunk_size=config["chunk_size"],
            norm_eps=config["norm_eps"],
            is_time=self.is_time,
            p2p_residual=config["p2p_residual"],
            time_drop_out=config["time_drop_out"],
            causal_time=self.is_time and config["time_encoding"] == "causal",
            backend=config["ssd_backend"],
            ssd_kernel=config["ssd_kernel"] or "fused",  # absent from older checkpoints
            product_kernel=config["product_kernel"] or "triton",
        )
        self.layers = nn.ModuleList(
            TiSSDLayer(
                self.hidden_size, self.dropout_prob, residual=self.num_layers > 1, **block_kwargs
            )
            for _ in range(self.num_layers)
        )
        if self.is_time:
            self.time_encoder = TimeGapEncoder(
                self.max_seq_length,
                self.layers[0].block.nheads,
                self.dropout_prob,
                config["time_encoding"],
            )
        self.loss_fct = nn.CrossEntropyLoss()
        self.apply(self._init_weights)

    @staticmethod
    def _is_time(config) -> bool:
        return bool(config["is_time"])

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()
        elif isinstance(module, nn.Conv1d) and self.is_kai_ming_init:
            nn.init.kaiming_normal_(module.weight, mode="fan_out")
            if module.bias is not None:
                module.bias.data.zero_()

    def encode(
        self, item_seq: torch.Tensor, item_seq_len: torch.Tensor, timestamps: torch.Tensor | None
    ) -> torch.Tensor:
        """Histories (B, L) and their timestamps -> hidden states at every position (B, L, d)."""
        hidden = self.layer_norm(self.item_embedding(item_seq))  # (B, L, d)
        time_signal = self.time_encoder(timestamps, item_seq_len) if self.is_time else None
        for layer in self.layers:
            hidden, time_signal = layer(hidden, time_signal)
        return hidden

    def forward(
        self, item_seq: torch.Tensor, item_seq_len: torch.Tensor, timestamps: torch.Tensor | None
    ) -> torch.Tensor:
        """Histories (B, L) and their timestamps -> user vectors (B, d)."""
        hidden = self.encode(item_seq, item_seq_len, timestamps)  # (B, L, d)
        return self.gather_indexes(hidden, item_seq_len - 1)  # (B, d)

    def _inputs(self, interaction) -> tuple:
        timestamps = interaction[self.time_field] if self.is_time else None
        return interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], timestamps

    def _user_vectors(self, interaction) -> torch.Tensor:
        return self.forward(*self._inputs(interaction))

    def calculate_loss(self, interaction) -> torch.Tensor:
        if POSITION_INDEX in interaction:
            # All-positions batch: windows (W, L), one target per listed position; for a
            # causal model, position i's state is that of the prefix sample ending at i.
            hidden = self.encode(*self._inputs(interaction)).flatten(0, 1)  # (W * L, d)
            user = hidden.index_select(0, interaction[POSITION_INDEX])  # (n, d)
        else:
            user = self._user_vectors(interaction)  # (B, d)
        logits = user @ self.item_embedding.weight.T  # (B, V)
        return self.loss_fct(logits, interaction[self.POS_ITEM_ID])

    def predict(self, interaction) -> torch.Tensor:
        user = self._user_vectors(interaction)  # (B, d)
        items = self.item_embedding(interaction[self.ITEM_ID])  # (B, d)
        return (user * items).sum(dim=-1)

    def full_sort_predict(self, interaction) -> torch.Tensor:
        return self._user_vectors(interaction) @ self.item_embedding.weight.T  # (B, V)


class SSD4Rec(TiM4Rec):
    """TiM4Rec without the time path: Mamba-2 (SSD) blocks + FFN (the paper's ablation)."""

    @staticmethod
    def _is_time(config) -> bool:
        return False

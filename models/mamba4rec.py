"""Mamba4Rec: sequential recommendation with selective state space models (Mamba-1).

Reference:
    Chengkai Liu, Jianghao Lin, Jianling Wang, Hanzhou Liu, James Caverlee.
    "Mamba4Rec: Towards Efficient Sequential Recommendation with Selective State Space
    Models." arXiv:2403.03900, 2024.

Items are embedded (Dropout, LayerNorm), then `num_layers` layers of one Mamba-1 block
(Gu & Dao, 2023) followed by a position-wise GELU feed-forward network, each sublayer with
dropout, a residual connection and LayerNorm. No time information. The user vector is the
hidden state at the last real position; scores are dot products with the tied item
embeddings; full softmax cross-entropy.

Mixer dispatch (`mamba_backend`): `mamba_ssm.Mamba` (CUDA selective-scan kernels) when
the compiled extension `selective_scan_cuda` is importable and the model is built for
CUDA; otherwise `MambaMixer`, the same block in PyTorch around
`models.selective_scan.selective_scan`, whose scan runs as Triton kernels on CUDA
(`models.selective_scan_triton`) and as a PyTorch parallel scan elsewhere. All have
identical parameter names and shapes, so checkpoints move between them. The log says
which one runs.

Initialisation follows RecBole/Mamba4Rec (Linear and Embedding N(0, 0.02), zero biases,
LayerNorm (1, 0)), except that each mixer's `dt_proj` keeps Mamba's own step-size
initialisation (dt in [1e-3, 0.1]), which defines the SSM's time scales.
"""

from __future__ import annotations

import importlib
import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender

from models.layers import Dropout, FeedForward
from models.selective_scan import selective_scan, triton_scan_available

logger = logging.getLogger(__name__)

MAMBA_BACKENDS = ("auto", "torch", "triton", "cuda")
_logged_paths: set[str] = set()


def cuda_kernels_available() -> bool:
    """True when mamba-ssm's compiled `selective_scan_cuda` extension can be imported."""
    try:
        importlib.import_module("selective_scan_cuda")
        importlib.import_module("mamba_ssm.modules.mamba_simple")
    except Exception:  # ImportError, or a wheel built for another torch/CUDA
        return False
    return True


class MambaMixer(nn.Module):
    """Mamba-1 block in PyTorch: the function of `mamba_ssm.Mamba`, same parameters.

    in_proj -> [x | z]; x -> causal depthwise conv -> SiLU -> x_proj -> (dt, B, C);
    y = selective_scan(x, dt_proj(dt), A, B, C, D, z) -> out_proj.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.scan_backend = scan_backend  # models.selective_scan.SCAN_BACKENDS
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.dt_rank = math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(
            self.d_inner,
            self.d_inner,
            kernel_size=d_conv,
            groups=self.d_inner,
            padding=d_conv - 1,
            bias=True,
        )
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

        # Mamba's step-size init: dt_proj.bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max].
        bound = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        log_dt = torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        dt = torch.exp(log_dt).clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # S4D-real init: A[d, n] = -(n + 1), stored as log.
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))  # (D, N)
        self.D = nn.Parameter(torch.ones(self.d_inner))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        seqlen = hidden.size(1)
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)  # (B, D, L) each
        x = self.act(self.conv1d(x)[..., :seqlen])  # causal: drop the right overhang
        dt, B, C = torch.split(
            self.x_proj(x.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1
        )  # (B, L, R), (B, L, N), (B, L, N)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # (B, D, L); bias goes in the scan
        y = selective_scan(
            x,
            dt,
            -torch.exp(self.A_log.float()),
            B.transpose(1, 2),
            C.transpose(1, 2),
            D=self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            backend=self.scan_backend,
        )  # (B, D, L)
        return self.out_proj(y.transpose(1, 2))  # (B, L, d)


def make_mixer(
    d_model: int, d_state: int, d_conv: int, expand: int, backend: str, device: torch.device
) -> nn.Module:
    """The Mamba-1 block for `backend` on `device`, logging which implementation runs.

    auto: `mamba_ssm.Mamba` on CUDA when its extension is there, else `MambaMixer` (Triton
    scan on CUDA when Triton is installed, PyTorch scan otherwise); cuda / triton / torch
    force one, with an error when it cannot run here.
    """
    if backend not in MAMBA_BACKENDS:
        raise ValueError(f"mamba_backend must be one of {MAMBA_BACKENDS}, got {backend!r}")
    on_cuda = device.type == "cuda"
    if backend == "cuda" and not cuda_kernels_available():
        raise ImportError(
            "mamba_backend='cuda' needs mamba-ssm with its compiled selective_scan_cuda "
            "extension (pip install mamba-ssm on a CUDA machine); use 'auto' or 'torch'"
        )
    if backend == "triton" and not (on_cuda and triton_scan_available()):
        raise ValueError(
            "mamba_backend='triton' needs a CUDA device and Triton installed; use 'auto' or 'torch'"
        )
    path = backend
    if backend == "auto":
        if on_cuda and cuda_kernels_available():
            path = "cuda"
        else:
            path = "triton" if on_cuda and triton_scan_available() else "torch"
    if path not in _logged_paths:
        _logged_paths.add(path)
        logger.info("Mamba4Rec mixer: %s", MIXER_DESCRIPTIONS[path])
    if path == "cuda":
        from mamba_ssm.modules.mamba_simple import Mamba

        return Mamba(d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand)
    # "auto" stays auto: the scan follows the tensors' device, also after model.to(...)
    scan_backend = "auto" if backend == "auto" else path
    return MambaMixer(
        d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand, scan_backend=scan_backend
    )


MIXER_DESCRIPTIONS = {
    "cuda": "mamba_ssm.Mamba (CUDA selective-scan kernels)",
    "triton": "MambaMixer with the Triton selective scan (models/selective_scan_triton.py)",
    "torch": "MambaMixer with the pure-PyTorch selective scan (parallel scan); "
    "mamba_ssm.Mamba runs on CUDA when its selective_scan_cuda extension is installed",
}


class MambaLayer(nn.Module):
    """Mamba block, Dropout, residual (when stacked), LayerNorm, then the FFN."""

    def __init__(self, mixer: nn.Module, d_model: int, dropout: float, residual: bool) -> None:
        super().__init__()
        self.mamba = mixer
        self.residual = residual
        self.dropout = Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d_model, eps=1e-12)
        self.ffn = FeedForward(d_model, dropout, nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.dropout(self.mamba(x))
        if self.residual:
            hidden = hidden + x
        return self.ffn(self.layer_norm(hidden))


class Mamba4Rec(SequentialRecommender):
    """Mamba4Rec as a RecBole sequential recommender (full softmax cross-entropy)."""

    def __init__(self, config, dataset) -> None:
        super().__init__(config, dataset)
        self.hidden_size = config["hidden_size"]
        self.num_layers = config["num_layers"]
        self.dropout_prob = config["dropout_prob"]
        if config["loss_type"] != "CE":
            raise ValueError(f"Mamba4Rec trains with loss_type: CE, got {config['loss_type']!r}")

        self.item_embedding = nn.Embedding(self.n_items, self.hidden_size, padding_idx=0)
        self.emb_dropout = Dropout(self.dropout_prob)
        self.layer_norm = nn.LayerNorm(self.hidden_size, eps=1e-12)
        device = torch.device(config["device"])
        self.layers = nn.ModuleList(
            MambaLayer(
                make_mixer(
                    self.hidden_size,
                    d_state=config["d_state"],
                    d_conv=config["d_conv"],
                    expand=config["expand"],
                    backend=config["mamba_backend"] or "auto",
                    device=device,
                ),
                self.hidden_size,
                self.dropout_prob,
                residual=self.num_layers > 1,
            )
            for _ in range(self.num_layers)
        )
        self.loss_fct = nn.CrossEntropyLoss()
        for name, module in self.named_modules():
            if not name.endswith("dt_proj"):  # keep Mamba's step-size init
                self._init_weights(module)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        """Histories (B, L) -> user vectors (B, d)."""
        hidden = self.layer_norm(self.emb_dropout(self.item_embedding(item_seq)))  # (B, L, d)
        for layer in self.layers:
            hidden = layer(hidden)
        return self.gather_indexes(hidden, item_seq_len - 1)  # (B, d)

    def calculate_loss(self, interaction) -> torch.Tensor:
        user = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        logits = user @ self.item_embedding.weight.T  # (B, V)
        return self.loss_fct(logits, interaction[self.POS_ITEM_ID])

    def predict(self, interaction) -> torch.Tensor:
        user = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return (user * self.item_embedding(interaction[self.ITEM_ID])).sum(dim=-1)  # (B,)

    def full_sort_predict(self, interaction) -> torch.Tensor:
        user = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return user @ self.item_embedding.weight.T  # (B, V)

"""Layers shared by the project's models."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.backend import resolve_backend


def _runs_triton(backend: str, device: torch.device) -> bool:
    # "torch" (the default of models without ssd_backend) needs no resolution, nor its log line
    return backend != "torch" and resolve_backend(backend, device) == "triton"


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """nn.functional.dropout, with the CPU's mask drawn by torch.rand.

    On the CPU ATen's bernoulli_ is ~4x slower than rand (31 vs 7.5 ms for a
    (256, 50, 256) mask on 2 cores): a quarter of a CPU training step. Same distribution
    (each element kept with probability 1 - p, scaled by 1 / (1 - p)), another random
    stream. Other devices call nn.functional.dropout unchanged.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
    keep = (torch.rand(x.shape, dtype=torch.float32) >= p).to(x.dtype)  # 1 keeps, 0 drops
    scale = 1.0 / (1.0 - p)
    if x.dtype in (torch.float32, torch.float64):
        return x * keep.mul_(scale)  # one pass over x: the mask carries the scale
    return x * keep * scale  # bf16, fp16: scaled in float and rounded once, as F.dropout


class Dropout(nn.Dropout):
    """nn.Dropout through `dropout` (fast masks on the CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


PRODUCT_KERNELS = ("cublas", "triton")  # the Triton backend's bias-free products


def product(x: torch.Tensor, weight: torch.Tensor, kernel: str = "triton") -> torch.Tensor:
    """x @ weight^T without bias, for products whose bias a fused kernel adds. "triton":
    this project's tf32x3 kernels for float32 products on CUDA that reduce over at most
    256 columns (models/products_triton.py; faster than cuBLAS there), F.linear for the
    rest (bf16 autocast, where cuBLAS is faster; wider products); "cublas": F.linear."""
    if kernel not in PRODUCT_KERNELS:
        raise ValueError(f"product_kernel must be one of {PRODUCT_KERNELS}, got {kernel!r}")
    float32 = x.dtype == weight.dtype == torch.float32
    if kernel == "triton" and x.is_cuda and float32 and not torch.is_autocast_enabled("cuda"):
        from models.products_triton import MAX_K, triton_product

        if x.shape[-1] <= MAX_K:
            return triton_product(x, weight)
    return F.linear(x, weight)


def dropout_add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    dropout_p: float,
    backend: str = "torch",
    x_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """LayerNorm(Dropout(x + x_bias) + residual) over the last axis (`residual` and
    `x_bias` may be None; `dropout_p` 0 in evaluation): one fused kernel each way on the
    Triton backend (models/layer_norm_triton.py), nn.functional otherwise. `x_bias` is
    the bias of the product `x` comes from, left to this op to add (`fuses_bias`)."""
    if _runs_triton(backend, x.device):
        from models.layer_norm_triton import DropoutAddLayerNorm as Fused

        return Fused.apply(x, residual, weight, bias, eps, dropout_p, x_bias)
    h = dropout(x if x_bias is None else x + x_bias, dropout_p)
    return F.layer_norm(h if residual is None else h + residual, weight.shape, weight, bias, eps)


def hardswish_dropout(
    x: torch.Tensor, dropout_p: float, backend: str = "torch", bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Dropout(Hardswish(x + bias)) (`bias` may be None; `dropout_p` 0 in evaluation): one
    fused kernel each way on the Triton backend (models/hardswish_dropout_triton.py), which
    also sums the bias gradient; nn.functional otherwise."""
    if _runs_triton(backend, x.device):
        from models.hardswish_dropout_triton import HardswishDropout

        return HardswishDropout.apply(x, dropout_p, bias)
    y = F.hardswish(x if bias is None else x + bias)
    return dropout(y, dropout_p)


def fuses_bias(backend: str, device: torch.device) -> bool:
    """Whether this project's fused Triton kernels run (`dropout_add_layer_norm`,
    `hardswish_dropout`, the SSD block's convolution and gated norm). Each can add the bias
    of the product that feeds it and sum that bias's gradient while writing its input's
    gradient: the product then runs without its bias, and no separate reduction reads the
    product's output gradient again (docs/performance_notes.md)."""
    return _runs_triton(backend, device)


class DropoutAddLayerNorm(nn.LayerNorm):
    """The post-norm residual connection LayerNorm(Dropout(x + x_bias) + residual)
    (`residual`, `x_bias` may be None) as one op (`dropout_add_layer_norm`); an
    nn.LayerNorm for its parameters."""

    def __init__(
        self, d_model: int, dropout: float, eps: float = 1e-5, backend: str = "torch"
    ) -> None:
        super().__init__(d_model, eps=eps)
        self.dropout_p = dropout
        self.backend = backend

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None = None,
        x_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        p = self.dropout_p if self.training else 0.0
        return dropout_add_layer_norm(
            x, residual, self.weight, self.bias, self.eps, p, self.backend, x_bias
        )


class FeedForward(nn.Module):
    """Position-wise FFN with a post-LayerNorm residual (TiM4Rec, Mamba4Rec, LRURec).

    out = LayerNorm(Dropout(W2 Dropout(act(W1 x))) + x), W1: d -> 4d, W2: 4d -> d.
    On the Triton backend (`backend` "triton", or "auto" on CUDA) with a Hardswish
    activation, the activation with its dropout and the residual norm run as fused
    kernels that also add W1's and W2's biases and sum their gradients (`fuses_bias`).
    """

    def __init__(
        self,
        d_model: int,
        dropout: float,
        activation: nn.Module,
        eps: float = 1e-12,
        backend: str = "torch",
        product_kernel: str = "triton",
    ) -> None:
        super().__init__()
        self.w_1 = nn.Linear(d_model, 4 * d_model)
        self.w_2 = nn.Linear(4 * d_model, d_model)
        self.activation = activation
        self.dropout = Dropout(dropout)
        self.layer_norm = DropoutAddLayerNorm(d_model, dropout, eps=eps, backend=backend)
        self.backend = backend
        self.product_kernel = product_kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, d) -> (B, L, d)
        if isinstance(self.activation, nn.Hardswish) and fuses_bias(self.backend, x.device):
            p = self.dropout.p if self.training else 0.0
            # (B, L, 4d), the bias added by the kernel
            hidden = product(x, self.w_1.weight, self.product_kernel)
            hidden = hardswish_dropout(hidden, p, self.backend, bias=self.w_1.bias)
            out = product(hidden, self.w_2.weight, self.product_kernel)
            return self.layer_norm(out, x, x_bias=self.w_2.bias)
        hidden = self.dropout(self.activation(self.w_1(x)))  # (B, L, 4d)
        return self.layer_norm(self.w_2(hidden), x)


class LowerTriangularLinear(nn.Linear):
    """Linear map along the sequence axis (L -> L) in which output i sees inputs j <= i.

    The causal counterpart of the time path's ``nn.Linear(L, L)``: the same parameters
    (an L x L weight, whose upper triangle is kept at zero, and a bias per position).
    """

    def __init__(self, length: int) -> None:
        super().__init__(length, length)
        self.register_buffer("mask", torch.ones(length, length).tril(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., L) -> (..., L)
        return nn.functional.linear(x, self.weight * self.mask, self.bias)


class PrefixLayerNorm(nn.LayerNorm):
    """LayerNorm over the sequence axis in which position i is normalised with the mean and
    variance of positions 0..i only: causal, so a prefix's values do not depend on what
    follows. Per-position weight and bias as ``nn.LayerNorm(L)``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., L) -> (..., L)
        count = torch.arange(1, x.size(-1) + 1, device=x.device, dtype=x.dtype)
        mean = x.cumsum(dim=-1) / count
        var = (x.square().cumsum(dim=-1) / count - mean.square()).clamp(min=0)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


def time_mix_norm(
    gate_logits: torch.Tensor,
    time_signal: torch.Tensor,
    theta: torch.Tensor,
    norm: nn.LayerNorm,
    backend: str = "torch",
) -> torch.Tensor:
    """The end of the time path: norm(s T + (1 - s) theta), s = sigmoid(gate_logits), along
    L. T, theta (B, H, L); gate_logits (B, H, L) or (B, H, 1); `norm` an nn.LayerNorm(L)
    or a PrefixLayerNorm(L). One fused kernel each way on the Triton backend
    (models/time_mix_norm_triton.py), PyTorch otherwise."""
    if _runs_triton(backend, time_signal.device):
        from models.time_mix_norm_triton import TimeMixNorm

        prefix = isinstance(norm, PrefixLayerNorm)
        return TimeMixNorm.apply(
            gate_logits, time_signal, theta, norm.weight, norm.bias, norm.eps, prefix
        )
    s = torch.sigmoid(gate_logits)
    return norm(s * time_signal + (1 - s) * theta)

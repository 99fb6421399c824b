"""The hardware floor of one TiM4Rec training step: fewest FLOPs, fewest bytes, best time.

floor time = max(FLOPs / peak FLOP/s, bytes / memory bandwidth)

FLOPs: the matrix products of the model (in_proj, causal convolutions, the chunked SSD
algorithm, out_proj, FFN, the time path's L x L MLP and gate, scoring against all items)
for the forward pass, times 3 for forward + backward (a product's backward computes the
gradients of both operands: twice its forward). Elementwise work (norms, activations,
softmax, Adam) is left out: it is bandwidth, counted below.

Bytes: what an ideal implementation must move to and from GPU memory even if each layer
were one fused kernel forward and one backward (recomputing its inside from its input):
the parameters, their gradients and Adam's two moments (float32); the batch; every tensor
that crosses a layer boundary (written and read once forward, its gradient written and
read once backward); the logits B x V written once and read once.

docs/benchmark.md states every assumption; `tests/test_benchmark.py` checks the FLOPs
against torch's FlopCounterMode and the parameter count against the model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# Dense peaks (no sparsity) from NVIDIA's data sheets: FLOP/s and memory bytes/s.
# Matched against torch.cuda.get_device_name() in this order, first hit wins.
DEVICE_PEAKS: tuple[tuple[str, dict], ...] = (
    ("H200", {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12, "bandwidth": 4.8e12}),
    ("H100 NVL", {"bf16": 835e12, "tf32": 418e12, "fp32": 60e12, "bandwidth": 3.9e12}),
    ("H100 PCIe", {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12, "bandwidth": 2.0e12}),
    ("H100", {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12, "bandwidth": 3.35e12}),  # SXM
    ("A100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12, "bandwidth": 2.0e12}),
)
ADAM_ACCESSES = 10  # per float32 parameter: read fwd, read bwd, write grad; Adam reads
# param, grad, m, v and writes param, m, v


@dataclass(frozen=True)
class StepShape:
    """One training step of TiM4Rec (SSD4Rec with `is_time=False`)."""

    batch: int  # B, sequences per step
    seq_len: int  # L, MAX_ITEM_LIST_LENGTH
    n_items: int  # V, item table rows including padding (dataset.item_num)
    hidden: int = 64  # d
    num_layers: int = 2
    expand: int = 2  # d_in = expand * d
    d_state: int = 32  # N
    head_dim: int = 32  # P; heads H = d_in / P
    d_conv: int = 4  # K
    chunk_size: int = 32  # Q
    ffn_mult: int = 4  # FFN width 4d
    is_time: bool = True
    p2p_residual: bool = False
    targets: int | None = None  # positions scored against all items; None: one per sequence

    @property
    def scored(self) -> int:
        """Positions whose hidden state is scored (all-positions training: its targets)."""
        return self.batch if self.targets is None else self.targets

    @property
    def d_inner(self) -> int:
        return self.expand * self.hidden

    @property
    def nheads(self) -> int:
        return self.d_inner // self.head_dim

    @classmethod
    def from_config(
        cls,
        config,
        n_items: int,
        is_time: bool | None = None,
        windows: int | None = None,
    ) -> StepShape:
        """The shape of a built RecBole config (TiM4Rec's or SSD4Rec's keys); `windows`:
        sequences per all-positions step, each scoring several of its train_batch_size
        targets."""
        return cls(
            batch=int(config["train_batch_size"]) if windows is None else windows,
            targets=None if windows is None else int(config["train_batch_size"]),
            seq_len=int(config["MAX_ITEM_LIST_LENGTH"]),
            n_items=int(n_items),
            hidden=int(config["hidden_size"]),
            num_layers=int(config["num_layers"]),
            expand=int(config["expand"]),
            d_state=int(config["d_state"]),
            head_dim=int(config["head_dim"]),
            d_conv=int(config["d_conv"]),
            chunk_size=int(config["chunk_size"]),
            is_time=bool(config["is_time"]) if is_time is None else is_time,
            p2p_residual=bool(config["p2p_residual"]),
        )


def parameter_count(s: StepShape) -> int:
    """Trainable parameters of TiM4Rec / SSD4Rec at this shape (tested against the model)."""
    d, d_in, N, H, K, L = s.hidden, s.d_inner, s.d_state, s.nheads, s.d_conv, s.seq_len
    proj_out = 2 * d_in + 2 * N + H
    block = (d + 1) * proj_out  # in_proj
    block += (d_in + 2 * N) * (K + 1)  # depthwise conv + bias
    block += 3 * H + d_in  # dt_bias, A_log, D, gated-norm weight
    block += (d_in + 1) * d  # out_proj
    if s.is_time:
        gate_out = L if s.p2p_residual else 1
        block += 2 * H * (K + 1)  # two time convolutions
        block += 2 * (L + 1) * L + (L + 1) * gate_out + 2 * L  # time MLP, gate, LayerNorm(L)
    layer = block + 2 * d  # LayerNorm after the block
    layer += (d + 1) * s.ffn_mult * d + (s.ffn_mult * d + 1) * d + 2 * d  # FFN + its LayerNorm
    total = s.n_items * d + 2 * d + s.num_layers * layer  # item table, embedding LayerNorm
    if s.is_time:
        total += 2 * L  # LayerNorm(L) of the time-gap encoder
    return total


def forward_flops(s: StepShape) -> dict[str, float]:
    """Forward FLOPs (2 per multiply-add) of one step, per component, all layers."""
    B, L, d, d_in = s.batch, s.seq_len, s.hidden, s.d_inner
    N, H, P, K, Q = s.d_state, s.nheads, s.head_dim, s.d_conv, s.chunk_size
    T = B * L  # tokens
    chunks = math.ceil(L / Q)
    per_layer = {
        "in_proj": 2 * T * d * (2 * d_in + 2 * N + H),
        "conv1d": 2 * T * (d_in + 2 * N) * K,
        # Chunked SSD, one B/C group: C B^T inside chunks (Q x Q, full blocks), its product
        # with x, chunk states, state passing (a scan over chunks), state read-out.
        "ssd_intra_cb": 2 * T * Q * N,
        "ssd_intra_y": 2 * T * Q * H * P,
        "ssd_states": 2 * T * H * P * N,
        "ssd_state_passing": 2 * B * chunks * H * P * N,
        "ssd_readout": 2 * T * H * P * N,
        "out_proj": 2 * T * d_in * d,
        "ffn": 2 * 2 * T * d * s.ffn_mult * d,
    }
    if s.is_time:  # (B, H, L) signal: two Linear(L, L), the gate, two depthwise convs
        per_layer["time_mlp"] = 2 * 2 * B * H * L * L
        per_layer["time_gate"] = 2 * B * H * L * (L if s.p2p_residual else 1)
        per_layer["time_conv"] = 2 * 2 * B * H * L * K
    flops = {name: float(value * s.num_layers) for name, value in per_layer.items()}
    flops["scoring"] = float(2 * s.scored * d * s.n_items)  # scored positions . all items
    return flops


def product_shapes(s: StepShape) -> list[tuple[str, int, int, int]]:
    """The step's matrix products as (name, rows m, inner k, columns n): Y (m x n) =
    X (m x k) W^T, all layers; `forward_flops` counts 2 m k n for each."""
    T, d, L = s.batch * s.seq_len, s.hidden, s.seq_len
    rows_time = s.batch * s.nheads  # the time path maps (B, H, L) signals along L
    products = []
    for _ in range(s.num_layers):
        products += [
            ("in_proj", T, d, 2 * s.d_inner + 2 * s.d_state + s.nheads),
            ("out_proj", T, s.d_inner, d),
            ("ffn", T, d, s.ffn_mult * d),
            ("ffn", T, s.ffn_mult * d, d),
        ]
        if s.is_time:
            products += [("time_mlp", rows_time, L, L), ("time_mlp", rows_time, L, L)]
            products += [("time_gate", rows_time, L, L if s.p2p_residual else 1)]
    products.append(("scoring", s.scored, d, s.n_items))
    return products


def separate_products_bytes(s: StepShape, activation_bytes: int) -> float:
    """Fewest bytes the matrix products move when each is its own kernel (as in every
    library), forward and backward: each of Y = X W^T, dX = dY W and dW = dY^T X reads
    its two operands and writes its result once, 3 (mk + kn + mn) elements."""
    return float(
        sum(3 * (m * k + k * n + m * n) for _, m, k, n in product_shapes(s)) * activation_bytes
    )


def training_flops(s: StepShape) -> float:
    """Forward + backward FLOPs of one step: 3 x forward."""
    return 3.0 * sum(forward_flops(s).values())


def training_bytes(s: StepShape, activation_bytes: int = 4) -> dict[str, float]:
    """Fewest bytes one step moves, per component (see the module docstring)."""
    B, L, d, H, V = s.batch, s.seq_len, s.hidden, s.nheads, s.n_items
    params = parameter_count(s)
    boundary = B * L * d * s.num_layers  # embedding output + outputs of all but the last layer
    boundary += s.scored * d  # the last layer's output, only at the scored positions
    if s.is_time:
        boundary += B * L + (s.num_layers - 1) * B * H * L  # encoder output, T' between layers
    return {
        "parameters_and_adam": float(params * 4 * ADAM_ACCESSES),
        "batch": float(B * L * (8 + (4 if s.is_time else 0)) + 2 * s.scored * 8),
        "layer_boundaries": float(4 * boundary * activation_bytes),  # fwd w/r, grad w/r
        "logits": float(2 * s.scored * V * activation_bytes),
    }


def device_peaks(device_name: str) -> dict | None:
    """Peak FLOP/s and bandwidth for a GPU name, or None (CPU, unknown GPU)."""
    for key, peaks in DEVICE_PEAKS:
        if key.lower() in device_name.lower():
            return {"matched": key, **peaks}
    return None


def floor(
    s: StepShape, precision: str, peaks: dict | None, allow_tf32: bool = False
) -> dict[str, object]:
    """FLOPs, bytes and (with `peaks`) the floor time of one step in `precision`.

    precision "bf16" (autocast: bfloat16 products and activations) or "fp32" (products on
    the FP32 units, or on TF32 tensor cores when `allow_tf32`, i.e. when torch's float32
    matmul precision is not "highest").
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    flops = forward_flops(s)
    bytes_moved = training_bytes(s, activation_bytes=2 if precision == "bf16" else 4)
    result: dict[str, object] = {
        "shape": asdict(s),
        "precision": precision,
        "parameters": parameter_count(s),
        "forward_flops": flops,
        "training_flops": training_flops(s),
        "bytes": bytes_moved,
        "training_bytes": sum(bytes_moved.values()),
        "separate_products_bytes": separate_products_bytes(s, 2 if precision == "bf16" else 4),
    }
    if peaks is None:
        return result
    unit = "bf16" if precision == "bf16" else ("tf32" if allow_tf32 else "fp32")
    compute_s = result["training_flops"] / peaks[unit]
    memory_s = result["training_bytes"] / peaks["bandwidth"]
    products_memory_s = result["separate_products_bytes"] / peaks["bandwidth"]
    result.update(
        products_memory_ms=1e3 * products_memory_s,
        peak_unit=unit,
        peak_flops=peaks[unit],
        bandwidth=peaks["bandwidth"],
        compute_ms=1e3 * compute_s,
        memory_ms=1e3 * memory_s,
        floor_ms=1e3 * max(compute_s, memory_s),
        bound="compute" if compute_s >= memory_s else "memory",
    )
    return result

"""Compile the project's Triton kernels for an H100/H200 (sm_90) on any machine with
Triton (no GPU: Triton ships ptxas), and read their registers and spills.

Used by tests/test_triton_compile.py (every kernel compiles for each constexpr combination
the model uses) and benchmarks/kernel_registers.py (registers and spills per launch
option). `ssd_kernel_args` and `conv_kernel_args` give each kernel's arguments at a shape:
tensors stand for pointers of their dtype, Python ints for scalars.
"""

from __future__ import annotations

import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from models.triton_launch import COMPILE_OPTIONS

POINTER_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.int64: "*i64"}
F32, BF16, I64 = (torch.empty(1, dtype=t) for t in (torch.float32, torch.bfloat16, torch.int64))


def compile_for_sm90(kernel, options: dict | None = None, **args) -> str:
    """PTX of `kernel` with these arguments and launch options (num_warps, num_stages), over
    models.triton_launch's COMPILE_OPTIONS as the model launches it: tensors stand for
    pointers of their dtype, Python ints and floats for scalars; `kernel`'s constexpr
    parameters and None pointers are compiled in."""
    signature, constexprs = {}, {}
    for param in kernel.params:
        value = args[param.name]
        if param.is_constexpr or value is None:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = POINTER_TYPES[value.dtype]
        else:
            signature[param.name] = "fp32" if isinstance(value, float) else "i32"
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    options = {**COMPILE_OPTIONS, **(options or {})}  # as the model launches them
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    return compiled.asm["ptx"]


def ptxas_resources(ptx: str) -> dict[str, int]:
    """Registers per thread and spill bytes per thread of PTX for sm_90a, from `ptxas -v`
    (the ptxas that Triton uses)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as source:
        source.write(ptx)
        source.flush()
        done = subprocess.run(
            [get_ptxas(90).path, "-v", "--gpu-name=sm_90a", source.name, "-o", "/dev/null"],
            capture_output=True,
            text=True,
            check=True,
        )
    log = done.stdout + done.stderr

    def number(pattern: str) -> int:
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    return dict(
        registers=number(r"Used (\d+) registers"),
        spill_stores=number(r"(\d+) bytes spill stores"),
        spill_loads=number(r"(\d+) bytes spill loads"),
    )


def ssd_kernel_args(L: int, Q: int, P: int, N: int, H: int, dtype: torch.Tensor) -> dict:
    """Arguments of models/ssd_triton.py's kernels: x, B, C packed in one (B, L, H P + 2N)
    conv output, `dtype` (F32 or BF16) for x, B, C, y and their gradients."""
    from models import ssd_triton as k

    W = H * P + 2 * N
    dt_strides = dict(s_dtb=L * H, s_dtl=H, s_dth=1)
    c_strides = dict(s_cb=L * W, s_cl=W)
    dy_strides = dict(s_dyb=L * H * P, s_dyl=H * P, s_dyh=P)
    chunks = dict(NCHUNKS=-(-L // Q), HAS_DTB=True, DT_SOFTPLUS=True, **k._blocks(Q, P, N))
    common = dict(
        x_ptr=dtype, dt_ptr=F32, a_ptr=F32, b_ptr=dtype, c_ptr=dtype, d_ptr=F32, dtb_ptr=F32,
        L=L, s_xb=L * W, s_xl=W, s_xh=P, s_bb=L * W, s_bl=W, HAS_D=True,
        **dt_strides, **c_strides, **chunks,
    )  # fmt: skip
    fwd = dict(y_ptr=dtype, states_ptr=F32, H=H, s_yb=L * H * P, s_yl=H * P, s_yh=P, **common)
    dstates = dict(
        dt_ptr=F32, a_ptr=F32, c_ptr=dtype, dtb_ptr=F32, dy_ptr=dtype, dstates_ptr=F32,
        L=L, H=H, **dt_strides, **c_strides, **dy_strides, **chunks,
    )  # fmt: skip
    chunk = dict(
        dy_ptr=dtype, states_ptr=F32, dstates_ptr=F32, dx_ptr=dtype, ddt_ptr=F32,
        db_ptr=dtype, dc_ptr=dtype, dsum_ptr=F32, NHEADS=H,
        s_dxb=L * W, s_dxl=W, s_dxh=P, s_ddtb=L * H, s_ddtl=H, s_dbb=L * W, s_dbl=W,
        s_dcb=L * W, s_dcl=W, **dy_strides, **common,
    )  # fmt: skip
    return {"_ssd_fwd": fwd, "_ssd_bwd_dstates": dstates, "_ssd_bwd_chunk": chunk}


def conv_launch(kernel: str, L: int, C: int) -> tuple[dict, dict]:
    """(compile-time arguments, launch options) of a causal convolution kernel at (L, C),
    as `models.causal_conv_triton.launch` gives them."""
    from models import causal_conv_triton as k

    options = k.launch(kernel, 1, L, C)[1]
    constexprs = {name: options.pop(name) for name in ("BLOCK_C", "UNROLL")}
    return constexprs, options


def conv_kernel_args(
    L: int, C: int, row_stride: int, dtype: torch.Tensor, x_bias: bool = True
) -> dict:
    """Arguments of models/causal_conv_triton.py's kernels: x a column slice of a wider
    projection (rows of `row_stride` elements) with that projection's bias (`x_bias`, as
    the block passes xBC), `dtype` for x, y and their gradients; tiles as the launch
    uses them (`conv_launch` gives the warps)."""
    common = dict(L=L, C=C, rows=64, K=4, HAS_XBIAS=x_bias)
    x_strides = dict(s_x_b=L * row_stride, s_x_l=row_stride, s_x_c=1)
    xb = F32 if x_bias else None
    fwd = dict(
        x_ptr=dtype, w_ptr=F32, b_ptr=F32, xb_ptr=xb, y_ptr=dtype, s_y_b=L * C, s_y_l=C, s_y_c=1,
        **x_strides, **common, **conv_launch("_causal_conv_fwd", L, C)[0],
    )  # fmt: skip
    bwd = dict(
        x_ptr=dtype, w_ptr=F32, b_ptr=F32, xb_ptr=xb, dy_ptr=dtype, dx_ptr=dtype,
        partials_ptr=F32, s_dy_b=L * C, s_dy_l=C, s_dy_c=1, s_dx_b=L * row_stride,
        s_dx_l=row_stride, s_dx_c=1, **x_strides, **common,
        **conv_launch("_causal_conv_bwd", L, C)[0],
    )  # fmt: skip
    return {"_causal_conv_fwd": fwd, "_causal_conv_bwd": bwd}


def time_mix_norm_kernel_args(L: int, H: int, dtype: torch.Tensor, prefix: bool = True) -> dict:
    """(arguments, launch options) of models/time_mix_norm_triton.py's kernels at the
    block's shapes: theta a transposed view of a (B, L, H) tensor, a gate per position with
    the prefix statistics (the causal path), per row without (the paper's)."""
    from models import time_mix_norm_triton as k

    common = dict(
        gate_ptr=dtype, t_ptr=F32, theta_ptr=dtype, w_ptr=F32, M=2400, H=H, L=L, s_tb=L * H,
        s_th=1, s_tl=H, eps=1e-5, GATE_PER_ROW=not prefix, PREFIX=prefix,
        BLOCK_L=triton.next_power_of_2(L),
    )  # fmt: skip
    out = {}
    for name, args in (
        ("_time_mix_norm_fwd", dict(b_ptr=F32, y_ptr=F32)),
        ("_time_mix_norm_bwd", dict(dy_ptr=F32, dgate_ptr=dtype, dt_ptr=F32, dtheta_ptr=dtype,
                                    dw_ptr=F32, db_ptr=F32)),
    ):  # fmt: skip
        options = dict(k.LAUNCH_OPTIONS[name])
        out[name] = (dict(ROWS=options.pop("ROWS"), **args, **common), options)
    return out

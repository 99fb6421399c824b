"""The project's Triton kernels compile to PTX for an H100/H200 (sm_90), on a CPU.

Triton's interpreter (the kernels' CPU tests) runs a kernel as Python, so it misses what
only the compiler rejects: a constexpr that stopped being one (e.g. passed through a
packed tuple) makes a constexpr-guarded branch compile for None pointers. This compiles
each kernel, for each constexpr combination the model uses, without a GPU (Triton ships
ptxas), so such errors show before a GPU run. Skipped where Triton is not installed (CI).
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

POINTER_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.int64: "*i64"}
F32, BF16, I64 = (torch.empty(1, dtype=t) for t in (torch.float32, torch.bfloat16, torch.int64))


def compile_for_sm90(kernel, **args) -> str:
    """PTX of `kernel` with these arguments: tensors stand for pointers of their dtype,
    Python ints and floats for scalars; `kernel`'s constexpr parameters and None pointers
    are compiled in."""
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
    return triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("dropout", [True, False])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_layer_norm_kernels_compile(residual, dropout, dtype):
    from models import layer_norm_triton as k

    res = F32 if residual else None
    seed = I64 if dropout else None
    common = dict(M=1000, N=64, s_x=64, s_res=64, p=0.1, HAS_RES=residual, HAS_DROPOUT=dropout)
    common.update(QROWS=32, BLOCK_N=64)
    compile_for_sm90(
        k._dropout_add_layer_norm_fwd, x_ptr=dtype, res_ptr=res, w_ptr=F32, b_ptr=F32,
        y_ptr=F32, mean_ptr=F32, rstd_ptr=F32, seed_ptr=seed, s_y=64, eps=1e-5, **common,
    )  # fmt: skip
    compile_for_sm90(
        k._dropout_add_layer_norm_bwd, x_ptr=dtype, res_ptr=res, w_ptr=F32, dy_ptr=F32,
        dx_ptr=dtype, dres_ptr=res, dw_ptr=F32, db_ptr=F32, mean_ptr=F32, rstd_ptr=F32,
        seed_ptr=seed, s_dy=64, s_dx=64, s_dres=64, STORE_DRES=residual, **common,
    )  # fmt: skip


@pytest.mark.parametrize("dropout", [True, False])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_hardswish_dropout_kernels_compile(dropout, dtype):
    from models import hardswish_dropout_triton as k

    common = dict(seed_ptr=I64 if dropout else None, n=5000, p=0.1, HAS_DROPOUT=dropout)
    common.update(QUARTER=k.QUARTER)
    compile_for_sm90(k._hardswish_dropout_fwd, x_ptr=dtype, y_ptr=dtype, **common)
    compile_for_sm90(k._hardswish_dropout_bwd, x_ptr=dtype, dy_ptr=dtype, dx_ptr=dtype, **common)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_causal_conv_kernels_compile(dtype):
    from models import causal_conv_triton as k

    common = dict(L=200, C=320, K=4, BLOCK_L=k.BLOCK_L, BLOCK_C=k.MAX_BLOCK_C)
    x_strides = dict(s_x_b=200 * 324, s_x_l=324, s_x_c=1)
    compile_for_sm90(
        k._causal_conv_fwd, x_ptr=dtype, w_ptr=F32, b_ptr=F32, y_ptr=dtype,
        s_y_b=200 * 320, s_y_l=320, s_y_c=1, **x_strides, **common,
    )  # fmt: skip
    compile_for_sm90(
        k._causal_conv_bwd_g, x_ptr=dtype, w_ptr=F32, b_ptr=F32, dy_ptr=dtype, g_ptr=F32,
        dw_ptr=F32, db_ptr=F32, s_dy_b=200 * 320, s_dy_l=320, s_dy_c=1, **x_strides, **common,
    )  # fmt: skip
    compile_for_sm90(
        k._causal_conv_bwd_dx, g_ptr=F32, w_ptr=F32, dx_ptr=dtype,
        s_dx_b=200 * 320, s_dx_l=320, s_dx_c=1, **common,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize(
    "shape", [(50, 32, 32, 32), (200, 32, 32, 32), (200, 32, 128, 64), (10, 4, 8, 4)]
)
def test_fused_ssd_kernels_compile(dtype, shape):
    from models import ssd_triton as k

    L, Q, P, N = shape
    H = 4
    W = H * P + 2 * N  # x, B, C packed in one conv output
    dt_strides = dict(s_dtb=L * H, s_dtl=H, s_dth=1)
    c_strides = dict(s_cb=L * W, s_cl=W)
    dy_strides = dict(s_dyb=L * H * P, s_dyl=H * P, s_dyh=P)
    chunks = dict(NCHUNKS=-(-L // Q), HAS_DTB=True, DT_SOFTPLUS=True, **k._blocks(Q, P, N))
    common = dict(
        x_ptr=dtype, dt_ptr=F32, a_ptr=F32, b_ptr=dtype, c_ptr=dtype, d_ptr=F32, dtb_ptr=F32,
        L=L, s_xb=L * W, s_xl=W, s_xh=P, s_bb=L * W, s_bl=W, HAS_D=True,
        **dt_strides, **c_strides, **chunks,
    )  # fmt: skip
    compile_for_sm90(
        k._ssd_fwd, y_ptr=dtype, states_ptr=F32, H=H, s_yb=L * H * P, s_yl=H * P, s_yh=P,
        **common,
    )  # fmt: skip
    compile_for_sm90(
        k._ssd_bwd_dstates, dt_ptr=F32, a_ptr=F32, c_ptr=dtype, dtb_ptr=F32, dy_ptr=dtype,
        dstates_ptr=F32, L=L, H=H, **dt_strides, **c_strides, **dy_strides, **chunks,
    )  # fmt: skip
    compile_for_sm90(
        k._ssd_bwd_chunk, dy_ptr=dtype, states_ptr=F32, dstates_ptr=F32, dx_ptr=dtype,
        ddt_ptr=F32, db_ptr=dtype, dc_ptr=dtype, dsum_ptr=F32, NHEADS=H,
        s_dxb=L * W, s_dxl=W, s_dxh=P, s_ddtb=L * H, s_ddtl=H, s_dbb=L * W, s_dbl=W,
        s_dcb=L * W, s_dcl=W, **dy_strides, **common,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("N", [128, 48])
def test_gated_norm_kernels_compile(dtype, N):
    from models import gated_norm_triton as k

    common = dict(M=1000, N=N, s_x=N, s_z=324, ROWS=k.ROWS, BLOCK_N=triton.next_power_of_2(N))
    compile_for_sm90(
        k._gated_rms_norm_fwd, x_ptr=dtype, z_ptr=dtype, w_ptr=F32, y_ptr=dtype, rstd_ptr=F32,
        s_y=N, eps=1e-5, **common,
    )  # fmt: skip
    compile_for_sm90(
        k._gated_rms_norm_bwd, x_ptr=dtype, z_ptr=dtype, w_ptr=F32, dy_ptr=dtype, rstd_ptr=F32,
        dx_ptr=dtype, dz_ptr=dtype, dw_ptr=F32, s_dy=N, s_dx=N, s_dz=N, **common,
    )  # fmt: skip

"""The fused SSD kernels (models/ssd_triton.py) against the float64 PyTorch reference:
output and all seven gradients, over shapes, layouts and dtypes; mamba-ssm's kernel on the
same inputs as a yardstick.

On CUDA (marked gpu), where `tl.dot` runs float32 as TF32 (relative errors ~1e-3, as
mamba-ssm's), and, where Triton is installed, on CPU through its interpreter (float32
throughout: ~1e-6).
"""

from __future__ import annotations

import pytest
import torch
from conftest import needs_triton_kernels, relative_error, run_in_triton_interpreter

from ssd import ssd_chunked, ssd_scan, ssd_scan_packed

NAMES = ("x", "dt", "A", "B", "C", "D", "dt_bias")

# (B, L, H, P, N, Q, layout): the paper's 64-d shape at L = 50 and 200, a length that ends
# inside a chunk, the 256-d shape, one step, and x, B, C as strided slices of one
# projection (as the model passes them).
CASES = [
    (8, 50, 4, 32, 32, 32, "contiguous"),
    (4, 200, 4, 32, 32, 32, "slices"),
    (3, 37, 2, 32, 16, 16, "contiguous"),
    (2, 70, 4, 128, 64, 32, "contiguous"),
    (2, 1, 4, 32, 32, 32, "slices"),
    (3, 10, 2, 8, 4, 4, "contiguous"),  # the tests' tiny models: every tile padded
    (2, 23, 3, 24, 20, 12, "slices"),  # sizes that are not powers of two
]
INTERPRETER_CASES = [
    (2, 50, 2, 16, 16, 16, "slices"),
    (1, 37, 2, 32, 16, 16, "contiguous"),
    (2, 11, 2, 8, 4, 4, "contiguous"),
    (1, 23, 3, 24, 20, 12, "slices"),
]


def make_inputs(case: tuple, seed: int) -> dict[str, torch.Tensor]:
    """float64 inputs as TiM4Rec's block makes them (dt before softplus, A < 0)."""
    batch, L, H, P, N = case[:5]
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    return dict(
        x=torch.randn(batch, L, H, P, **f64),
        dt=0.5 * torch.randn(batch, L, H, **f64),
        A=-torch.rand(H, **f64) * 15 - 1,
        B=torch.randn(batch, L, 1, N, **f64),
        C=torch.randn(batch, L, 1, N, **f64),
        D=torch.randn(H, **f64),
        dt_bias=torch.randn(H, **f64) - 4,
    )


def _as_kernel_inputs(inputs: dict, device: str, dtype: torch.dtype, layout: str) -> dict:
    """x, B, C in `dtype` (the rest float32) on `device`; with layout 'slices', x, B and C
    are column slices of one (B, L, H * P + 2N) tensor."""
    out = {k: v.to(device=device, dtype=torch.float32) for k, v in inputs.items()}
    for k in ("x", "B", "C"):
        out[k] = inputs[k].to(device=device, dtype=dtype)
    if layout == "slices":
        batch, L, H, P = inputs["x"].shape
        N = inputs["B"].size(-1)
        packed = torch.cat(
            [out["x"].reshape(batch, L, H * P), out["B"][:, :, 0], out["C"][:, :, 0]], -1
        )
        x, B, C = torch.split(packed, [H * P, N, N], dim=-1)
        out.update(x=x.view(batch, L, H, P), B=B.view(batch, L, 1, N), C=C.view(batch, L, 1, N))
        assert not out["x"].is_contiguous()
    return {k: v.detach().requires_grad_() for k, v in out.items()}


def relative_errors(case: tuple, device: str, kernel: str, dtype=torch.float32) -> dict:
    """Relative errors (norm of the difference over the norm) of y and each gradient."""
    Q, layout = case[5], case[6]
    inputs = make_inputs(case, seed=sum(case[:6]))
    for k in ("x", "B", "C"):  # the values the kernel sees
        inputs[k] = inputs[k].to(dtype).double()
    grad = torch.randn(
        inputs["x"].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    ref = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y_ref = ssd_chunked(**ref, chunk_size=Q, dt_softplus=True)
    grads_ref = torch.autograd.grad(y_ref, list(ref.values()), grad)

    fast = _as_kernel_inputs(inputs, device, dtype, layout)
    if device == "cuda":
        y = ssd_scan(**fast, chunk_size=Q, dt_softplus=True, backend="triton", kernel=kernel)
    else:  # Triton's interpreter runs the fused kernel on CPU tensors
        from models.ssd_triton import fused_ssd

        y = fused_ssd(**fast, chunk_size=Q, dt_softplus=True)
    assert y.shape == y_ref.shape and y.dtype == dtype
    grads = torch.autograd.grad(y, list(fast.values()), grad.to(device=device, dtype=dtype))
    errors = {"y": relative_error(y, y_ref.detach())}
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        assert g.shape == g_ref.shape and g.dtype == fast[name].dtype, name
        errors["d" + name] = relative_error(g, g_ref)
    return errors


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["fused", "mamba"])
@pytest.mark.parametrize("case", CASES)
def test_ssd_kernels_match_float64_reference(case, kernel):
    needs_triton_kernels()
    errors = relative_errors(case, "cuda", kernel)
    print(f"\n[gpu] SSD {kernel} {case}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert max(errors.values()) < 1e-2, errors


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["fused", "mamba"])
def test_ssd_kernels_with_bf16_inputs(kernel):
    """x, B, C in bf16 (conv outputs under autocast): float32 arithmetic, y and dx in bf16."""
    needs_triton_kernels()
    errors = relative_errors(CASES[1], "cuda", kernel, dtype=torch.bfloat16)
    print(f"\n[gpu] SSD {kernel} bf16: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert max(errors.values()) < 2e-2, errors


@pytest.mark.gpu
def test_fused_ssd_in_cuda_graph_replays():
    """Captured forward + backward replays give the eager results on new inputs."""
    needs_triton_kernels()
    from models.ssd_triton import fused_ssd

    inputs = {k: v.float().cuda() for k, v in make_inputs(CASES[0], seed=3).items()}
    static = {k: v.clone().requires_grad_() for k, v in inputs.items()}

    def step():
        y = fused_ssd(**static, chunk_size=32, dt_softplus=True)
        return (y,) + torch.autograd.grad(y.square().sum(), list(static.values()))

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    fresh = {k: v.float().cuda() for k, v in make_inputs(CASES[0], seed=4).items()}
    for k, v in fresh.items():
        static[k].data.copy_(v)
    graph.replay()
    want = step()
    for got, expected in zip(outs, want):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_fused_ssd_refuses_shapes_it_does_not_handle():
    pytest.importorskip("triton")
    from models.ssd_triton import check_shapes

    inputs = make_inputs((2, 10, 2, 32, 16), seed=0)
    x, dt, A, B, C = (inputs[k] for k in ("x", "dt", "A", "B", "C"))
    check_shapes(x, dt, A, B, C)
    with pytest.raises(ValueError, match="one B/C group .* use ssd_kernel: mamba"):
        check_shapes(x, dt, A, B.expand(2, 10, 2, 16), C.expand(2, 10, 2, 16))
    with pytest.raises(ValueError, match=r"dt must be \(B, L, H\)"):
        check_shapes(x, dt[..., :1], A, B, C)


def test_fused_ssd_packed_refuses_widths_that_are_not_heads_plus_b_and_c():
    pytest.importorskip("triton")
    from models.ssd_triton import fused_ssd_packed

    dt, A = torch.zeros(2, 10, 4), -torch.ones(4)
    with pytest.raises(ValueError, match=r"must be H \* P \+ 2N with H = 4 heads and N = 16"):
        fused_ssd_packed(torch.zeros(2, 10, 4 * 8 + 2 * 16 + 1), dt, A, 4, 16, chunk_size=8)
    with pytest.raises(ValueError, match=r"dt must be \(B, L, H\)"):
        fused_ssd_packed(torch.zeros(2, 10, 4 * 8 + 2 * 16), dt[..., :2], A, 4, 16, chunk_size=8)


def test_packed_scan_is_the_scan_of_the_unpacked_columns():
    """ssd_scan_packed on the reference backend: the same y and gradients as ssd_scan on
    x, B, C split off the packed tensor by hand."""
    inputs = {k: v.float() for k, v in make_inputs((2, 37, 2, 8, 4), seed=5).items()}
    xBC = torch.cat([inputs["x"].flatten(2), inputs["B"][:, :, 0], inputs["C"][:, :, 0]], -1)
    xBC.requires_grad_()
    rest = {k: inputs[k] for k in ("dt", "A", "D", "dt_bias")}
    y = ssd_scan_packed(xBC, d_state=4, chunk_size=16, backend="torch", **rest)
    x, B, C = torch.split(xBC, [16, 4, 4], dim=-1)
    want = ssd_scan(
        x.reshape(2, 37, 2, 8), B=B[:, :, None], C=C[:, :, None], chunk_size=16, backend="torch",
        **rest,
    )  # fmt: skip
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    grad = torch.randn_like(y)
    (got,) = torch.autograd.grad(y, xBC, grad)
    (expected,) = torch.autograd.grad(want, xBC, grad)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_unknown_ssd_kernel_is_refused():
    inputs = make_inputs((1, 4, 2, 16, 16), seed=0)
    with pytest.raises(ValueError, match="ssd_kernel must be one of"):
        ssd_scan(**inputs, chunk_size=16, kernel="cuda")


def test_fused_ssd_in_interpreter():
    """The kernels' logic on CPU, in Triton's interpreter (skipped where Triton is not installed)."""
    code = (
        "from tests.test_ssd_triton import INTERPRETER_CASES, relative_errors\n"
        "for case in INTERPRETER_CASES:\n"
        "    errors = relative_errors(case, 'cpu', 'fused')\n"
        "    assert max(errors.values()) < 2e-5, (case, errors)\n"
        "print('ok')\n"
    )
    run_in_triton_interpreter(code)

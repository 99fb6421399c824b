"""mamba-ssm's Triton kernels against the PyTorch path, and the whole model on CPU vs CUDA.

Marked `gpu`: skipped without CUDA. Triton's `tl.dot` runs float32 inputs as TF32, so the
tolerances are TF32's (relative error around 1e-3), not float32's.
"""

from __future__ import annotations

import pytest
import torch
from conftest import needs_triton_kernels

from ssd import rmsnorm_gated, rmsnorm_gated_reference, ssd_chunked, ssd_scan

pytestmark = pytest.mark.gpu


def ssd_inputs(batch, seqlen, nheads, headdim, dstate, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    return dict(
        x=torch.randn(batch, seqlen, nheads, headdim, device=dev, generator=g),
        dt=torch.randn(batch, seqlen, nheads, device=dev, generator=g) * 0.5,
        A=-torch.rand(nheads, device=dev, generator=g) * 15 - 1,
        B=torch.randn(batch, seqlen, 1, dstate, device=dev, generator=g),
        C=torch.randn(batch, seqlen, 1, dstate, device=dev, generator=g),
        D=torch.randn(nheads, device=dev, generator=g),
        dt_bias=torch.randn(nheads, device=dev, generator=g) - 4,
    )


# (B, L, H, P, N): the paper's 64-d shapes at L = 50 and 200, the 256-d shape, odd lengths
SHAPES = [(64, 50, 4, 32, 32), (32, 200, 4, 32, 32), (16, 200, 4, 128, 64), (8, 37, 4, 32, 32)]


@pytest.mark.parametrize("shape", SHAPES)
def test_triton_ssd_forward_backward_match_torch(shape):
    needs_triton_kernels()
    inp = ssd_inputs(*shape, seed=sum(shape))
    grad_out = torch.randn_like(inp["x"])
    results = {}
    for backend in ("triton", "torch"):
        leaves = {k: v.clone().requires_grad_(True) for k, v in inp.items()}
        y = ssd_scan(**leaves, chunk_size=32, dt_softplus=True, backend=backend)
        (y * grad_out).sum().backward()
        results[backend] = (y.detach(), {k: v.grad for k, v in leaves.items()})
    y_tri, g_tri = results["triton"]
    errors = {"y": (y_tri - results["torch"][0]).abs().max().item()}
    y_ref, g_ref = results["torch"]
    # float64 truth to size the error of both paths
    truth = ssd_chunked(**{k: v.double() for k, v in inp.items()}, chunk_size=32, dt_softplus=True)
    scale = truth.abs().max().item()
    assert (y_tri.double() - truth).abs().max().item() < 2e-2 * scale
    torch.testing.assert_close(y_tri, y_ref, rtol=2e-2, atol=2e-2 * scale)
    for name in inp:
        ref = g_ref[name]
        err = (g_tri[name] - ref).abs().max().item()
        errors["d" + name] = err
        assert err <= 3e-2 * ref.abs().max().item() + 1e-4, (name, err)

    print(
        f"\n[gpu] SSD {shape} max |triton - torch|: "
        + ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
    )


def test_triton_rmsnorm_gated_matches_torch():
    needs_triton_kernels()
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 128, device="cuda", generator=g, requires_grad=True)
    z = torch.randn(4096, 128, device="cuda", generator=g, requires_grad=True)
    w = torch.rand(128, device="cuda", generator=g).requires_grad_(True)
    grad_out = torch.randn(4096, 128, device="cuda", generator=g)
    outs = {}
    for backend in ("triton", "torch"):
        for t in (x, z, w):
            t.grad = None
        y = rmsnorm_gated(x, z, w, 1e-5, backend=backend)
        (y * grad_out).sum().backward()
        outs[backend] = (y.detach(), x.grad.clone(), z.grad.clone(), w.grad.clone())
    diffs = [(a - b).abs().max().item() for a, b in zip(outs["triton"], outs["torch"])]
    print(
        "\n[gpu] gated RMSNorm max |triton - torch| (y, dx, dz, dw): "
        + ", ".join(f"{d:.2e}" for d in diffs)
    )
    for a, b in zip(outs["triton"], outs["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs["torch"][0], rmsnorm_gated_reference(x, z, w, 1e-5).detach())


@pytest.mark.parametrize("model_name", ["TiM4Rec", "SSD4Rec", "Mamba4Rec"])
def test_model_scores_same_on_cpu_and_cuda(model_name, ml100k_slice):
    """Same weights, same batch: CPU (PyTorch scans) and CUDA (Triton kernels) scores agree."""
    needs_triton_kernels()
    from recbole.data import create_dataset, data_preparation

    from pipeline.config import build_config
    from pipeline.registry import get_model_class

    cls = get_model_class(model_name)
    overrides = {
        "dataset": "ml-slice",
        "data_path": str(ml100k_slice),
        "MAX_ITEM_LIST_LENGTH": 50,
        "device": "cpu",
        "use_gpu": False,
    }
    config = build_config(cls, [], overrides)
    dataset = create_dataset(config)
    _, _, test_data = data_preparation(config, dataset)
    torch.manual_seed(0)
    model = cls(config, dataset).eval()
    with torch.no_grad():  # a trained-looking time path, so that it matters in the comparison
        for name, p in model.named_parameters():
            if "time_mlp" in name or "time_conv" in name:
                p.normal_(0, 0.3)
    interaction = next(iter(test_data))[0]
    with torch.no_grad():
        cpu_scores = model.full_sort_predict(interaction)
        model.cuda()
        cuda_scores = model.full_sort_predict(interaction.to("cuda")).cpu()
    layer = model.layers[0]
    backend = layer.mamba.scan_backend if model_name == "Mamba4Rec" else layer.block.backend
    assert backend == "auto"
    scale = cpu_scores.abs().max().item()
    err = (cuda_scores - cpu_scores).abs().max().item()
    print(f"\n[gpu] {model_name} scores max |cuda - cpu| {err:.2e} (max |score| {scale:.2e})")
    assert err < 1e-2 * scale, err
    # the top-10 lists agree up to ties broken by TF32 noise
    top_cpu = cpu_scores.topk(10).indices
    top_cuda = cuda_scores.topk(10).indices
    overlap = (top_cpu[:, :, None] == top_cuda[:, None, :]).any(-1).float().mean().item()
    assert overlap > 0.95

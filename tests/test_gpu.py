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


def build_model(model_name: str, ml100k_slice, **overrides):
    """The model on ml-slice (L = 50), its config and its data loaders, built on the CPU."""
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
        **overrides,
    }
    config = build_config(cls, [], overrides)
    dataset = create_dataset(config)
    loaders = data_preparation(config, dataset)
    torch.manual_seed(0)
    return cls(config, dataset), loaders


@pytest.mark.parametrize("model_name", ["TiM4Rec", "SSD4Rec", "Mamba4Rec"])
def test_model_scores_same_on_cpu_and_cuda(model_name, ml100k_slice):
    """Same weights, same batch: CPU (PyTorch scans) and CUDA (Triton kernels) scores agree."""
    model, (_, _, test_data) = build_model(model_name, ml100k_slice)
    model.eval()
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


@pytest.mark.parametrize(
    "model_name, product_kernel",
    [("TiM4Rec", "cublas"), ("SSD4Rec", "cublas"), ("TiM4Rec", "triton")],
)
def test_model_training_gradients_same_on_cpu_and_cuda(model_name, product_kernel, ml100k_slice):
    """One training batch, dropout off: the loss and every parameter's gradient agree
    between CPU (PyTorch) and CUDA (the Triton kernels, which add the biases of in_proj,
    out_proj and the FFN themselves and sum their gradients). Biases are random, so that
    a bias the kernels dropped or mis-summed shows."""
    model, (train_data, _, _) = build_model(
        model_name,
        ml100k_slice,
        dropout_prob=0.0,
        time_drop_out=0.0,
        product_kernel=product_kernel,
    )
    model.train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "time_mlp" in name or "time_conv" in name:
                p.normal_(0, 0.3)
    interaction = next(iter(train_data))
    results = {}
    for device in ("cpu", "cuda"):
        model.to(device).zero_grad()
        loss = model.calculate_loss(interaction.to(device))
        loss.backward()
        grads = {  # the last layer's time output is unused: its gate and norm get no gradient
            n: p.grad.detach().cpu().clone()
            for n, p in model.named_parameters()
            if p.grad is not None
        }
        results[device] = (loss.item(), grads)
    (loss_cpu, grads_cpu), (loss_cuda, grads_cuda) = results["cpu"], results["cuda"]
    assert set(grads_cuda) == set(grads_cpu)
    errors = {
        n: ((grads_cuda[n] - g).norm() / g.norm().clamp(min=1e-12)).item()
        for n, g in grads_cpu.items()
        if g.norm() > 0
    }
    worst = max(errors, key=errors.get)
    folded = ("in_proj.bias", "conv1d.bias", "out_proj.bias", "w_1.bias", "w_2.bias")
    bias_errors = {n: e for n, e in errors.items() if n.endswith(folded)}
    print(
        f"\n[gpu] {model_name} training ({product_kernel} products): loss cpu {loss_cpu:.6f} cuda {loss_cuda:.6f}; "
        f"largest gradient error {errors[worst]:.1e} ({worst}); folded biases: "
        + ", ".join(f"{n} {e:.1e}" for n, e in bias_errors.items())
    )
    assert abs(loss_cuda - loss_cpu) < 1e-3 * abs(loss_cpu)
    assert len(bias_errors) == 5 * model.num_layers
    assert max(bias_errors.values()) < 1e-3, bias_errors  # float32 sums
    # the scan's products run in TF32 (module docstring): A_log's gradient, a sum of many
    # cancelling terms, is the most sensitive (~1e-2)
    assert errors[worst] < 5e-2, (worst, errors[worst])

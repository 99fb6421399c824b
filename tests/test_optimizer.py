"""Adam / AdamW with torch's fused kernel (`fused_optimizer`, pipeline/optimizer.py): the
same groups and hyperparameters, the same updates as RecBole's foreach optimizer, and
checkpoints that resume into either implementation."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_RUN
from recbole.data import create_dataset
from torch import nn, optim

from pipeline.config import build_config
from pipeline.optimizer import load_state_keeping_kernel, uses_fused_kernel, with_fused_kernel
from pipeline.trainer import ProjectTrainer
from tim4rec import TiM4Rec

CPU = ("cpu",)


def model(seed: int = 0, device: str = "cpu") -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3)).to(device)


def train(net: nn.Module, optimizer: optim.Optimizer, steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    device = next(net.parameters()).device
    for _ in range(steps):
        x = torch.randn(16, 6, generator=g).to(device)
        optimizer.zero_grad()
        net(x).square().mean().backward()
        optimizer.step()


def assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("cls", [optim.Adam, optim.AdamW])
def test_fused_optimizer_keeps_groups_and_computes_the_same_updates(cls):
    reference, fused_net = model(), model()
    reference_opt = cls(reference.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.8, 0.95))
    fused_opt = with_fused_kernel(
        cls(fused_net.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.8, 0.95)), CPU
    )
    assert type(fused_opt) is cls and uses_fused_kernel(fused_opt)
    assert not uses_fused_kernel(reference_opt)
    for ref_group, group in zip(reference_opt.param_groups, fused_opt.param_groups):
        for key in ("lr", "weight_decay", "betas", "eps", "amsgrad", "maximize"):
            assert group[key] == ref_group[key], key
    train(reference, reference_opt, steps=5)
    train(fused_net, fused_opt, steps=5)
    assert_same_parameters(fused_net, reference)


def test_only_adam_on_the_named_devices_with_no_state_is_rebuilt():
    net = model()
    adam = optim.Adam(net.parameters())
    assert with_fused_kernel(adam) is adam  # CPU parameters, CUDA asked for
    sgd = optim.SGD(net.parameters(), lr=0.1)
    assert with_fused_kernel(sgd, CPU) is sgd
    train(net, adam, steps=1)
    assert with_fused_kernel(adam, CPU) is adam  # has state: a rebuild would lose it


@pytest.mark.parametrize("saved_fused", [False, True])
def test_a_checkpointed_state_resumes_into_either_implementation(saved_fused):
    uninterrupted = model()
    uninterrupted_opt = optim.Adam(uninterrupted.parameters(), lr=1e-2)
    train(uninterrupted, uninterrupted_opt, steps=6)

    first = model()
    first_opt = optim.Adam(first.parameters(), lr=1e-2)
    if saved_fused:
        first_opt = with_fused_kernel(first_opt, CPU)
    train(first, first_opt, steps=3)
    # a copy, as torch.save makes: state_dict() shares the optimizer's tensors
    saved = copy.deepcopy({"model": first.state_dict(), "optimizer": first_opt.state_dict()})

    resumed = model(seed=5)
    resumed.load_state_dict(saved["model"])
    resumed_opt = optim.Adam(resumed.parameters(), lr=1e-2)
    if not saved_fused:
        resumed_opt = with_fused_kernel(resumed_opt, CPU)
    load_state_keeping_kernel(resumed_opt, saved["optimizer"])
    assert uses_fused_kernel(resumed_opt) is not saved_fused  # this run's choice kept
    train(resumed, resumed_opt, steps=3, seed=2)
    train(first, first_opt, steps=3, seed=2)
    assert_same_parameters(resumed, first)


def test_a_state_from_another_model_is_still_refused():
    opt = optim.Adam(model().parameters())
    other = optim.Adam(nn.Linear(2, 2).parameters())
    with pytest.raises(ValueError, match="size"):
        load_state_keeping_kernel(opt, other.state_dict())


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [True, False])
def test_the_trainer_fuses_adam_on_cuda_unless_switched_off(ml_tiny, tmp_path, fused):
    overrides = {**TINY_RUN, "data_path": str(ml_tiny), "checkpoint_dir": str(tmp_path)}
    config = build_config(TiM4Rec, [], {**overrides, "fused_optimizer": fused})
    dataset = create_dataset(config)
    trainer = ProjectTrainer(config, TiM4Rec(config, dataset).to("cuda"), dataset)
    assert uses_fused_kernel(trainer.optimizer) is fused

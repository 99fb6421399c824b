"""SyncFreeTrainer's training epoch (ProjectTrainer's and the data-parallel loop's) against RecBole's: the same steps and summed loss, the
same NaN error, without RecBole's two host syncs per step."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from recbole.trainer import Trainer

from pipeline.trainer import NAN_CHECK_STEPS, SyncFreeTrainer

STEPS = 2 * NAN_CHECK_STEPS + 7


def stand_in(model: torch.nn.Module) -> types.SimpleNamespace:
    """What both epoch loops read from a trainer, around `model`."""
    trainer = types.SimpleNamespace(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        device=torch.device("cpu"),
        config={"single_spec": True},
        enable_scaler=False,
        enable_amp=False,
        clip_grad_norm=None,
        gpu_available=False,
    )
    trainer._check_nan = types.MethodType(Trainer._check_nan, trainer)
    return trainer


def batches(n: int = STEPS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(16, 4, generator=g) for _ in range(n)]


def squared(model):
    return lambda x: model(x).pow(2).mean()


def two_parts(model):
    return lambda x: (model(x).pow(2).mean(), model(x).abs().mean())


@pytest.mark.parametrize("loss", [squared, two_parts])
def test_same_steps_and_loss_sum_as_recbole(loss):
    torch.manual_seed(0)
    ours = stand_in(torch.nn.Linear(4, 3))
    theirs = stand_in(copy.deepcopy(ours.model))
    data = batches()
    total = SyncFreeTrainer._train_epoch(ours, data, 1, loss_func=loss(ours.model))
    expected = Trainer._train_epoch(theirs, data, 1, loss_func=loss(theirs.model))
    assert type(total) is type(expected)
    assert total == pytest.approx(expected, rel=1e-12)
    for a, b in zip(ours.model.parameters(), theirs.model.parameters()):
        assert torch.equal(a, b)


def test_nan_loss_stops_the_epoch():
    trainer = stand_in(torch.nn.Linear(4, 3))
    data = batches()
    data[3] = torch.full((16, 4), float("nan"))
    with pytest.raises(ValueError, match="Training loss is nan"):
        SyncFreeTrainer._train_epoch(trainer, data, 1, loss_func=squared(trainer.model))


def test_host_syncs_once_per_nan_check_not_per_step(monkeypatch):
    reads = []
    for name in ("item", "tolist", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    trainer = stand_in(torch.nn.Linear(4, 3))
    SyncFreeTrainer._train_epoch(trainer, batches(), 1, loss_func=squared(trainer.model))
    ours = len(reads)
    reads.clear()
    recbole = stand_in(torch.nn.Linear(4, 3))
    Trainer._train_epoch(recbole, batches(), 1, loss_func=squared(recbole.model))
    assert ours == STEPS // NAN_CHECK_STEPS + 2  # the checks, the last check, the total
    assert len(reads) >= 2 * STEPS


def test_precision_autocast_names_and_graph_capture_cache():
    from pipeline.precision import autocast

    with autocast("cpu", "bf16"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch.is_autocast_enabled("cpu") and torch.is_autocast_cache_enabled()
    with autocast("cpu", "bf16", cache_enabled=False):  # what CUDA-graph capture needs
        assert torch.is_autocast_enabled("cpu") and not torch.is_autocast_cache_enabled()
    with autocast("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="precision must be fp32 or bf16, got 'fp16'"):
        autocast("cpu", "fp16")

"""Pinned Triton autotune configurations (models/triton_autotune.py), on stand-in kernels.

The real kernels need Triton and mamba-ssm; where both are installed, the shipped table is
also checked against them (every pinned configuration exists in the installed kernels).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from models import backend, triton_autotune
from models.triton_autotune import PINNED, chosen, configure, pin, table_from_chosen, unpin


def config(warps, stages, **kwargs):
    return SimpleNamespace(kwargs=kwargs, num_warps=warps, num_stages=stages)


def kernels():
    """Two autotuned stand-ins with three and two configurations."""
    return {
        "ssd_bmm.fwd": SimpleNamespace(
            configs=[
                config(4, 3, BLOCK_SIZE_M=64),
                config(8, 3, BLOCK_SIZE_M=128),
                config(2, 5, BLOCK_SIZE_M=32),
            ],
            cache={},
        ),  # fmt: skip
        "ssd_bmm.bwd": SimpleNamespace(
            configs=[config(4, 3, BLOCK_SIZE_N=64), config(4, 4)], cache={}
        ),
    }


def test_pin_keeps_only_the_listed_configs_and_unpin_restores():
    ks = kernels()
    full = {name: list(k.configs) for name, k in ks.items()}
    table = {"ssd_bmm.fwd": [({"BLOCK_SIZE_M": 128}, 8, 3), ({"BLOCK_SIZE_M": 32}, 2, 5)]}
    assert pin(ks, table) == ["ssd_bmm.fwd"]
    assert ks["ssd_bmm.fwd"].configs == [full["ssd_bmm.fwd"][1], full["ssd_bmm.fwd"][2]]
    assert ks["ssd_bmm.bwd"].configs == full["ssd_bmm.bwd"]  # not in the table: untouched
    assert pin(ks, table) == ["ssd_bmm.fwd"]  # idempotent: narrows from the full list again
    assert len(ks["ssd_bmm.fwd"].configs) == 2
    unpin(ks)
    assert {name: k.configs for name, k in ks.items()} == full


def test_pinned_config_missing_from_kernel_keeps_the_search(caplog):
    ks = kernels()
    table = {"ssd_bmm.fwd": [({"BLOCK_SIZE_M": 128}, 8, 3), ({"BLOCK_SIZE_M": 256}, 8, 3)]}
    with caplog.at_level(logging.WARNING, logger="models.triton_autotune"):
        assert pin(ks, table) == []
    assert len(ks["ssd_bmm.fwd"].configs) == 3
    assert "do not match this mamba-ssm's kernel" in caplog.text


def test_configure_search_and_bad_mode():
    ks = kernels()
    pin(ks, {"ssd_bmm.bwd": [({}, 4, 4)]})
    assert len(ks["ssd_bmm.bwd"].configs) == 1
    assert configure("search", ks) == []
    assert len(ks["ssd_bmm.bwd"].configs) == 2
    with pytest.raises(ValueError, match="triton_autotune must be one of"):
        configure("fast", ks)
    with pytest.raises(ValueError, match="triton_autotune must be one of"):
        backend.set_triton_autotune("fast")


def test_chosen_configs_become_a_table_that_pins_them():
    ks = kernels()
    fwd = ks["ssd_bmm.fwd"]
    fwd.cache = {(32, "torch.float32"): fwd.configs[1], (32, "torch.bfloat16"): fwd.configs[1]}
    ks["ssd_bmm.bwd"].cache = {(32, "torch.float32"): ks["ssd_bmm.bwd"].configs[0]}
    picked = chosen(ks)
    assert picked["ssd_bmm.fwd"][0] == {
        "key": ["32", "torch.float32"], "kwargs": {"BLOCK_SIZE_M": 128},
        "num_warps": 8, "num_stages": 3,
    }  # fmt: skip
    table = table_from_chosen(picked)
    assert table == {
        "ssd_bmm.fwd": [({"BLOCK_SIZE_M": 128}, 8, 3)],  # one winner for both keys
        "ssd_bmm.bwd": [({"BLOCK_SIZE_N": 64}, 4, 3)],
    }
    assert sorted(pin(ks, table)) == ["ssd_bmm.bwd", "ssd_bmm.fwd"]
    assert [len(k.configs) for k in ks.values()] == [1, 1]


def test_shipped_table_is_well_formed():
    for name, configs in PINNED.items():
        module, _, function = name.partition(".")
        assert module in triton_autotune.KERNEL_MODULES and function.startswith("_")
        assert 1 <= len(configs) <= 2, name  # at most two to compile and time
        for kwargs, warps, stages in configs:
            assert isinstance(kwargs, dict) and warps in (1, 2, 4, 8, 16) and stages >= 1


def test_shipped_table_matches_the_installed_kernels():
    pytest.importorskip("triton")
    if backend.import_mamba_triton() is None:
        pytest.skip("mamba-ssm's Triton kernels are not installed")
    ks = triton_autotune.autotuners()
    assert set(PINNED) <= set(ks)
    try:
        assert sorted(pin(ks)) == sorted(PINNED)
        for name, configs in PINNED.items():
            assert len(ks[name].configs) == len(configs)
    finally:
        configure("pinned")  # the process default

"""Adam and AdamW as one fused kernel per step on CUDA (`fused_optimizer: True`).

RecBole builds `torch.optim.Adam(params, lr, weight_decay)`, which on CUDA runs torch's
foreach implementation: about a dozen multi-tensor launches per step, each issued by the
host. torch's `fused=True` computes the same update (the same formula, up to float
rounding) in one launch. On an H200 this saves host time, not GPU time: the graphed step
stayed at 9.0 ms, the host's time to issue a default-mode step fell from 20.5 to 15.3 ms
(docs/performance_notes.md).
"""

from __future__ import annotations

from torch import optim

FUSABLE = (optim.Adam, optim.AdamW)
IMPLEMENTATION_KEYS = ("fused", "foreach")  # how a step runs, not what it computes


def with_fused_kernel(
    optimizer: optim.Optimizer, devices: tuple[str, ...] = ("cuda",)
) -> optim.Optimizer:
    """The same optimizer (groups, hyperparameters) built with `fused=True` when it is Adam
    or AdamW and every parameter is a floating tensor on one of `devices`; else unchanged.
    Call before the first step: the optimizer's state is not carried over."""
    if type(optimizer) not in FUSABLE or optimizer.state:
        return optimizer
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not params or not all(p.device.type in devices and p.is_floating_point() for p in params):
        return optimizer
    groups = [
        {k: v for k, v in group.items() if k not in IMPLEMENTATION_KEYS}
        for group in optimizer.param_groups
    ]
    return type(optimizer)(groups, fused=True)


def load_state_keeping_kernel(optimizer: optim.Optimizer, state: dict) -> None:
    """optimizer.load_state_dict(state), keeping this optimizer's implementation (fused or
    foreach) rather than the one the state was saved with: a checkpoint written by a CPU
    run resumes on CUDA with the fused kernel, and one from CUDA resumes on a CPU."""
    groups = [
        {**saved, **{k: current[k] for k in IMPLEMENTATION_KEYS if k in current}}
        for saved, current in zip(state["param_groups"], optimizer.param_groups, strict=False)
    ]
    optimizer.load_state_dict({**state, "param_groups": groups})


def uses_fused_kernel(optimizer: optim.Optimizer) -> bool:
    """Whether a step of `optimizer` runs torch's fused kernel."""
    return any(group.get("fused") for group in optimizer.param_groups)

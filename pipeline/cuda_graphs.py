"""Training losses replayed as CUDA graphs (`train_cuda_graph: True`).

A TiM4Rec training step issues about 500 kernels. In all-positions mode (or in bf16) the
GPU runs them faster than Python issues them: on an H200 the host needs ~28 ms to queue
an all-positions step that the GPU finishes in ~15 ms (docs/performance_notes.md). A CUDA
graph records the forward and the backward pass once per batch shape and replays each as
one launch, so the step costs the GPU's time.

Graphs need fixed shapes: DeviceTrainLoader pads its batches (`pad_batches`) to a few
shapes, padding rows that the loss ignores (label -100), so the loss and the gradients
are those of the unpadded batch. One graph pair is captured per shape
(`torch.cuda.make_graphed_callables`), all in one memory pool; dropout stays random
(PyTorch's generator advances at every replay).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from logging import getLogger

import torch
from recbole.data.interaction import Interaction
from torch import nn

from pipeline.precision import autocast


class _LossOfTensors(nn.Module):
    """model.calculate_loss as a function of the batch's tensors (what graphs capture)."""

    def __init__(self, model: nn.Module, fields: tuple[str, ...], autocast: Callable) -> None:
        super().__init__()
        self.model = model
        self.fields = fields
        self.autocast = autocast

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.model.calculate_loss(Interaction(dict(zip(self.fields, tensors))))


class GraphedTrainingLoss:
    """Call with a training batch (Interaction on CUDA): its loss, its backward pass
    replayed from a CUDA graph captured for the batch's shapes on first sight."""

    def __init__(self, model: nn.Module, precision: str = "fp32") -> None:
        self.model = model
        self.precision = precision
        self.graphs: dict[tuple, nn.Module] = {}
        self.pool = None

    def autocast(self) -> contextlib.AbstractContextManager:
        # Graph capture cannot keep autocast's cache of cast weights: replays would read
        # stale copies after the optimizer step.
        return autocast("cuda", self.precision, cache_enabled=False)

    def __call__(self, interaction: Interaction) -> torch.Tensor:
        fields = tuple(sorted(interaction.interaction))
        tensors = tuple(interaction[f] for f in fields)
        key = tuple((f, t.shape, t.dtype) for f, t in zip(fields, tensors))
        graphed = self.graphs.get(key)
        if graphed is None:
            graphed = self._capture(fields, tensors)
            self.graphs[key] = graphed
        graphed.train(self.model.training)
        return graphed(*tensors)

    def _capture(self, fields: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> nn.Module:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        module = _LossOfTensors(self.model, fields, self.autocast)
        module.train(self.model.training)
        shapes = {f: tuple(t.shape) for f, t in zip(fields, tensors)}
        getLogger().info(f"capturing a CUDA graph of the training step for shapes {shapes}")
        # Unused parameters: the last layer's time-path outputs feed nothing.
        return torch.cuda.make_graphed_callables(
            module, tensors, allow_unused_input=True, pool=self.pool
        )

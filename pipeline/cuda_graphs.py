"""Training losses replayed as CUDA graphs (`train_cuda_graph: True`).

A TiM4Rec training step issues about 500 kernels. In all-positions mode (or in bf16) the
GPU runs them faster than Python issues them: on an H200 the host needs ~28 ms to queue
an all-positions step that the GPU finishes in ~15 ms (docs/performance_notes.md). A CUDA
graph records the forward and the backward pass once per batch shape and replays each as
one launch, so the step costs the GPU's time.

Graphs need fixed shapes: DeviceTrainLoader pads its batches (`pad_batches`) to a few
shapes, padding rows that the loss ignores (label -100), so the loss and the gradients
are those of the unpadded batch. One graph pair (forward, backward) is captured per shape,
all in one memory pool; dropout stays random (PyTorch's generator advances at every
replay).

Warm-up and capture run on one stream per GraphedTrainingLoss. cuBLAS keeps a 32 MiB
workspace per (thread, stream) it has run on, for the life of the process (torch 2.11);
`torch.cuda.make_graphed_callables` warms up on a fresh pooled stream at every call, so
each captured shape used to leave ~64 MiB allocated after training ended (0.41 GiB after
one benchmark row, docs/performance_notes.md). One stream per loss leaves one set. Not
one stream per process: later torch releases free a stream's workspaces when any graph
captured on it is destroyed (pytorch/pytorch#193402), under other owners' live graphs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from logging import getLogger

import torch
from recbole.data.interaction import Interaction
from torch import nn
from torch.autograd.function import once_differentiable

from pipeline.precision import autocast

# Forward + backward passes run before capture: the first compiles and autotunes the
# Triton kernels, the later ones settle cuBLAS heuristics and allocator blocks.
WARMUP_PASSES = 3


class _ReplayLoss(torch.autograd.Function):
    """The captured loss as an autograd node: forward replays the forward graph, backward
    the backward graph, which writes the parameters' gradients."""

    @staticmethod
    def forward(ctx, captured: _CapturedLoss, *params: torch.Tensor) -> torch.Tensor:
        ctx.captured = captured
        captured.forward_graph.replay()
        return captured.loss.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx, loss_grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        captured = ctx.captured
        if captured.loss_grad.data_ptr() != loss_grad.data_ptr():
            captured.loss_grad.copy_(loss_grad)
        captured.backward_graph.replay()
        return (None, *(None if g is None else g.detach() for g in captured.grads))


class _CapturedLoss:
    """One batch shape's loss, its forward and backward pass recorded as two CUDA graphs
    on static input buffers."""

    def __init__(
        self,
        loss_fn: Callable[..., torch.Tensor],
        params: tuple[nn.Parameter, ...],
        inputs: tuple[torch.Tensor, ...],
        stream: torch.cuda.Stream,
        pool: tuple,
    ) -> None:
        self.params = params
        self.inputs = tuple(t.clone() for t in inputs)  # static buffers the graphs read
        # Compile, autotune and allocate workspaces before capture, on the capture stream.
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_PASSES):
                torch.autograd.grad(loss_fn(*self.inputs), params, allow_unused=True)
        torch.cuda.current_stream().wait_stream(stream)
        self.forward_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.forward_graph, pool=pool, stream=stream):
            self.loss = loss_fn(*self.inputs)  # () static output
        self.loss_grad = torch.empty_like(self.loss)
        self.backward_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.backward_graph, pool=pool, stream=stream):
            # Unused parameters (the last layer's time-path outputs feed nothing) get None.
            self.grads = torch.autograd.grad(
                self.loss, params, grad_outputs=self.loss_grad, allow_unused=True
            )

    def __call__(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        for buffer, tensor in zip(self.inputs, inputs):
            if buffer.data_ptr() != tensor.data_ptr():
                buffer.copy_(tensor)
        return _ReplayLoss.apply(self, *self.params)


class GraphedTrainingLoss:
    """Call with a training batch (Interaction on CUDA): its loss, its backward pass
    replayed from a CUDA graph captured for the batch's shapes on first sight."""

    def __init__(self, model: nn.Module, precision: str = "fp32") -> None:
        self.model = model
        self.precision = precision
        self.graphs: dict[tuple, _CapturedLoss] = {}
        self.pool = None
        self.stream = None  # every warm-up and capture of this loss, see the module doc

    def autocast(self) -> contextlib.AbstractContextManager:
        # Graph capture cannot keep autocast's cache of cast weights: replays would read
        # stale copies after the optimizer step.
        return autocast("cuda", self.precision, cache_enabled=False)

    def __call__(self, interaction: Interaction) -> torch.Tensor:
        fields = tuple(sorted(interaction.interaction))
        tensors = tuple(interaction[f] for f in fields)
        key = (self.model.training, *((f, t.shape, t.dtype) for f, t in zip(fields, tensors)))
        captured = self.graphs.get(key)
        if captured is None:
            captured = self._capture(fields, tensors)
            self.graphs[key] = captured
        return captured(tensors)

    def _capture(self, fields: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> _CapturedLoss:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
            self.stream = torch.cuda.Stream(tensors[0].device)
        shapes = {f: tuple(t.shape) for f, t in zip(fields, tensors)}
        getLogger().info(f"capturing a CUDA graph of the training step for shapes {shapes}")

        def loss_fn(*inputs: torch.Tensor) -> torch.Tensor:
            with self.autocast():
                return self.model.calculate_loss(Interaction(dict(zip(fields, inputs))))

        params = tuple(p for p in self.model.parameters() if p.requires_grad)
        return _CapturedLoss(loss_fn, params, tensors, self.stream, self.pool)

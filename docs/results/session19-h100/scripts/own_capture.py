"""Prototype: GraphedTrainingLoss capture with warm-up and capture on one stream per owner
(or one per process), instead of make_graphed_callables' fresh pooled stream per call."""
import torch
from torch.autograd.function import once_differentiable
from pipeline import cuda_graphs

_SHARED = {}

class _Captured:
    pass

class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, captured, *params):
        ctx.captured = captured
        captured.fwd.replay()
        return captured.loss.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        c = ctx.captured
        if c.loss_grad.data_ptr() != grad.data_ptr():
            c.loss_grad.copy_(grad)
        c.bwd.replay()
        return (None, *(g.detach() if g is not None else None for g in c.grads))


def make_capture(mode):
    def _capture(self, fields, tensors):
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        if mode == "shared":
            stream = _SHARED.setdefault(tensors[0].device, torch.cuda.Stream(tensors[0].device))
        else:
            if getattr(self, "stream", None) is None:
                self.stream = torch.cuda.Stream(tensors[0].device)
            stream = self.stream
        module = cuda_graphs._LossOfTensors(self.model, fields, self.autocast)
        params = tuple(p for p in self.model.parameters() if p.requires_grad)
        static = tuple(t.clone() for t in tensors)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                loss = module(*static)
                torch.autograd.grad(loss, params, allow_unused=True)
            del loss
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        c = _Captured()
        c.fwd, c.bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(c.fwd, pool=self.pool, stream=stream):
            c.loss = module(*static)
        c.loss_grad = torch.empty_like(c.loss)
        with torch.cuda.graph(c.bwd, pool=self.pool, stream=stream):
            c.grads = torch.autograd.grad(c.loss, params, grad_outputs=c.loss_grad, allow_unused=True)

        class Replayed(torch.nn.Module):
            def forward(self_, *inputs):
                for s, t in zip(static, inputs):
                    if s.data_ptr() != t.data_ptr():
                        s.copy_(t)
                return _Replay.apply(c, *params)
        return Replayed()
    return _capture


def install(mode):
    cuda_graphs.GraphedTrainingLoss._capture = make_capture(mode)

"""Causal depthwise conv + Hardswish, forward + backward: F.conv1d against four shifted
multiply-adds, memory kept (run from the repository root)."""
import sys, os, time, torch, torch.nn.functional as F
sys.path.insert(0, os.getcwd())
from pipeline.host_memory import keep_freed_memory
keep_freed_memory()
from ssd import causal_conv1d_hardswish_reference
def shift(x, w, b):
    K, L = w.shape[-1], x.shape[1]
    xp = F.pad(x, (0, 0, K - 1, 0))
    out = b + sum(xp[:, k:k + L] * w[:, 0, k] for k in range(K))
    return F.hardswish(out)
for Bn in (256, 2048):
    x = torch.randn(Bn, 50, 192, requires_grad=True); w = torch.randn(192, 1, 4, requires_grad=True); b = torch.randn(192, requires_grad=True)
    g = torch.randn(Bn, 50, 192)
    y0 = causal_conv1d_hardswish_reference(x, w, b); y1 = shift(x, w, b)
    print("maxdiff", (y0 - y1).abs().max().item())
    for name, fn in (("conv1d", causal_conv1d_hardswish_reference), ("shift", shift)):
        ts = []
        for i in range(7):
            t = time.perf_counter(); y = fn(x, w, b); y.backward(g); ts.append(time.perf_counter() - t)
        print(Bn, name, "fwd+bwd ms min %.1f med %.1f" % (1000 * min(ts[2:]), 1000 * sorted(ts[2:])[2]))

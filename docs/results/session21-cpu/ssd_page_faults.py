"""Page faults and times of the PyTorch SSD scan at B=2048, whole and in batch slices; run
from the repository root, with and without MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647."""
import os, sys, time, torch, resource
sys.path.insert(0, os.getcwd())
from ssd import ssd_chunked
Bn, L, H, P, N = 2048, 50, 4, 32, 32
torch.manual_seed(0)
x = torch.randn(Bn, L, H, P, requires_grad=True); dt = torch.randn(Bn, L, H, requires_grad=True)
A = -torch.rand(H) * 4 - 0.5
B = torch.randn(Bn, L, 1, N, requires_grad=True); C = torch.randn(Bn, L, 1, N, requires_grad=True)
D = torch.ones(H, requires_grad=True); bias = torch.zeros(H, requires_grad=True)
g = torch.randn(Bn, L, H, P)
def sliced(x, dt, A, B, C, Q, D, dt_bias, dt_softplus, s=256):
    return torch.cat([ssd_chunked(x[i:i+s], dt[i:i+s], A, B[i:i+s], C[i:i+s], Q, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus) for i in range(0, x.size(0), s)])
for name, fn in [("full", lambda: ssd_chunked(x, dt, A, B, C, 25, D=D, dt_bias=bias, dt_softplus=True)),
                 ("sliced256", lambda: sliced(x, dt, A, B, C, 25, D, bias, True)),
                 ("sliced64", lambda: sliced(x, dt, A, B, C, 25, D, bias, True, 64))]:
    ts = []
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for i in range(4):
        t = time.perf_counter(); y = fn(); t1 = time.perf_counter(); y.backward(g); ts.append((t1-t, time.perf_counter()-t1))
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(name, ["%.0f/%.0f" % (1000*a, 1000*b) for a, b in ts], "minflt/iter", (r1.ru_minflt - r0.ru_minflt)//4, "sys s", round(r1.ru_stime - r0.ru_stime, 2), "user", round(r1.ru_utime-r0.ru_utime, 2))

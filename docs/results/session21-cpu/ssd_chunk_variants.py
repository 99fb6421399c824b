"""PyTorch SSD scan forward + backward: chunk length 32 against the even chunk length, and
heads folded into the state products (v2); run from the repository root."""
import os, sys, time, math, torch
import torch.nn.functional as F
sys.path.insert(0, os.getcwd())
from ssd import ssd_chunked, _discretize, _decay_matrix

def ssd_v2(x, dt, A, B, C, chunk_size, D=None, dt_bias=None, dt_softplus=False):
    """heads folded into the matmuls that share B, C."""
    batch, seqlen, nheads, headdim = x.shape
    Q = chunk_size
    delta = _discretize(dt, dt_bias, dt_softplus).to(x.dtype)
    pad = (-seqlen) % Q
    xs, Bs, Cs = x, B, C
    if pad:
        xs = F.pad(x, (0, 0, 0, 0, 0, pad)); delta = F.pad(delta, (0, 0, 0, pad))
        Bs = F.pad(B, (0, 0, 0, 0, 0, pad)); Cs = F.pad(C, (0, 0, 0, 0, 0, pad))
    c = (seqlen + pad) // Q
    G = B.size(2); K = nheads // G; N = B.size(-1); P = headdim
    # (B, G, c, Q, K, P): x * delta
    Xd = (xs * delta[..., None]).view(batch, c, Q, G, K, P).permute(0, 3, 1, 2, 4, 5)
    Bc = Bs.view(batch, c, Q, G, N).permute(0, 3, 1, 2, 4)  # (B, G, c, Q, N)
    Cc = Cs.view(batch, c, Q, G, N).permute(0, 3, 1, 2, 4)
    A_dt = (delta * A).view(batch, c, Q, G, K).permute(0, 3, 1, 4, 2)  # (B, G, c, K, Q)
    A_cum = torch.cumsum(A_dt, dim=-1)  # (B, G, c, K, Q)
    CB = Cc @ Bc.transpose(-1, -2)  # (B, G, c, Q, Q)
    scores = CB[:, :, :, None] * _decay_matrix(A_cum)  # (B, G, c, K, Q, Q)
    y_diag = scores @ Xd.transpose(3, 4)  # (B, G, c, K, Q, P)
    decay_to_end = torch.exp(A_cum[..., -1:] - A_cum)  # (B, G, c, K, Q)
    Xe = Xd * decay_to_end.transpose(-1, -2)[..., None]  # (B, G, c, Q, K, P)
    states = Bc.transpose(-1, -2) @ Xe.flatten(-2)  # (B, G, c, N, K*P)
    decay_chunks = _decay_matrix(torch.cumsum(A_cum[..., -1], dim=2).transpose(-1, -2))  # (B, G, K, c, c)
    st = states.view(batch, G, c, N, K, P).permute(0, 1, 4, 2, 3, 5)  # (B, G, K, c, N, P)
    states_end = (decay_chunks @ st.flatten(-2)).view_as(st)  # (B,G,K,c,N,P)
    states_in = torch.cat([torch.zeros_like(states_end[..., :1, :, :]), states_end[..., :-1, :, :]], dim=-3)
    si = states_in.permute(0, 1, 3, 4, 2, 5).flatten(-2)  # (B, G, c, N, K*P)
    y_off = (Cc @ si).view(batch, G, c, Q, K, P) * torch.exp(A_cum).transpose(-1, -2)[..., None]
    y = y_diag.transpose(3, 4) + y_off  # (B, G, c, Q, K, P)
    y = y.permute(0, 2, 3, 1, 4, 5).reshape(batch, c * Q, nheads, headdim)[:, :seqlen]
    if D is not None:
        y = y + D[:, None] * x
    return y

def balanced(L, Q):
    c = -(-L // Q); return -(-L // c)

def bench(fn, inp, g, Q, n=6):
    ts = []
    for i in range(n):
        for t_ in inp: t_.grad = None
        t = time.perf_counter(); y = fn(*inp[:2], A, *inp[2:4], Q, D=inp[4], dt_bias=inp[5], dt_softplus=True)
        t1 = time.perf_counter(); y.backward(g); ts.append((t1 - t, time.perf_counter() - t1))
    ts = ts[2:]
    return 1000 * min(a for a, b in ts), 1000 * min(b for a, b in ts), 1000*min(a+b for a,b in ts)

for (Bn, L) in [(256, 50), (2048, 50), (128, 200)]:
    H, P, N = 4, 32, 32
    torch.manual_seed(0)
    x = torch.randn(Bn, L, H, P, requires_grad=True); dt = torch.randn(Bn, L, H, requires_grad=True)
    A = -torch.rand(H) * 4 - 0.5
    B = torch.randn(Bn, L, 1, N, requires_grad=True); C = torch.randn(Bn, L, 1, N, requires_grad=True)
    D = torch.ones(H, requires_grad=True); bias = torch.zeros(H, requires_grad=True)
    inp = [x, dt, B, C, D, bias]
    g = torch.randn(Bn, L, H, P)
    # correctness
    y0 = ssd_chunked(x.double(), dt.double(), A.double(), B.double(), C.double(), 32, D=D.double(), dt_bias=bias.double(), dt_softplus=True)
    for name, fn, Q in [("v0 Q32", ssd_chunked, 32), ("v0 bal", ssd_chunked, balanced(L, 32)), ("v2 Q32", ssd_v2, 32), ("v2 bal", ssd_v2, balanced(L, 32))]:
        y = fn(x, dt, A, B, C, Q, D=D, dt_bias=bias, dt_softplus=True)
        err = ((y.double() - y0).abs().max() / y0.abs().max()).item()
        print(Bn, L, name, "Q", Q, "fwd/bwd/total ms %.1f %.1f %.1f" % bench(fn, inp, g, Q), "err %.1e" % err)

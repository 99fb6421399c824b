"""Scratch: time variants of the SSD chunk-gradient kernel (fwd + bwd of one layer)."""
import importlib.util, json, sys, itertools
import torch
sys.path.insert(0, ".")
from benchmarks import measure
from benchmarks.ssd_kernels import make_inputs

def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); return m

mods = {"v0": load(".gpu_data/v0.py", "v0"), "v1": load(".gpu_data/v1.py", "v1"), "v4": load(".gpu_data/v4.py", "v4")}
dev = torch.device("cuda")
B, L, H, P, N = 600, 200, 4, 32, 32
rows = []
for dtype in (torch.float32, torch.bfloat16):
    torch.manual_seed(0)
    inputs = make_inputs(B, L, H, P, N, dtype)
    leaves = list(inputs.values())
    def call(m):
        return m.fused_ssd_packed(inputs["xBC"], inputs["dt"], inputs["A"], H, N, 32, D=inputs["D"], dt_bias=inputs["dt_bias"], dt_softplus=True)
    grad = torch.randn_like(call(mods["v0"]))
    ref = torch.autograd.grad(call(mods["v0"]), leaves, grad)
    configs = [("v0", 1, dict(num_warps=2, num_stages=1))]
    for v, g, ws, ss in (("v1", 1, (2, 4), (1, 2)), ("v4", 2, (2, 4), (1,)), ("v4", 4, (2, 4, 8), (1, 2))):
        for w, s in itertools.product(ws, ss):
            configs.append((v, g, dict(num_warps=w, num_stages=s)))
    configs += [("v4", 4, dict(num_warps=2, num_stages=1, maxnreg=168)), ("v4", 4, dict(num_warps=4, num_stages=1, maxnreg=128)),
                ("v1", 1, dict(num_warps=4, num_stages=1, maxnreg=128))]
    for v, g, opts in configs:
        m = mods[v]
        m.LAUNCH_OPTIONS["_ssd_bwd_chunk"] = dict(opts)
        if hasattr(m, "HEAD_GROUPS"): m.HEAD_GROUPS = g
        try:
            fb = lambda: torch.autograd.grad(call(m), leaves, grad)
            out = fb()
            err = max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30)).item() for a, b in zip(out, ref))
            for _ in range(3): fb()
            ms, launches, events = measure.gpu_busy(fb, dev, 20)
            kern = {e.key: e.self_device_time_total / 1e3 / 20 for e in events if e.device_type == torch.autograd.DeviceType.CUDA}
            chunk = sum(t for k, t in kern.items() if "_ssd_bwd_chunk" in k)
            row = dict(dtype=str(dtype)[6:], variant=v, groups=g, opts=opts, fwd_bwd_ms=ms, chunk_ms=chunk, rel_err=err, kernels=kern)
        except Exception as e:  # noqa
            row = dict(dtype=str(dtype)[6:], variant=v, groups=g, opts=opts, error=f"{type(e).__name__}: {str(e)[:200]}")
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "kernels"}), flush=True)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
print("| dtype | variant | groups | options | fwd+bwd ms | chunk kernel ms | rel err |")
for r in rows:
    if "error" in r: print(f"| {r['dtype']} | {r['variant']} | {r['groups']} | {r['opts']} | error | {r['error'][:60]} | |"); continue
    print(f"| {r['dtype']} | {r['variant']} | {r['groups']} | {r['opts']} | {r['fwd_bwd_ms']:.3f} | {r['chunk_ms']:.3f} | {r['rel_err']:.1e} |")

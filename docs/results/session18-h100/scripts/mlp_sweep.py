"""Scratch: the fused time MLP's launch options against PyTorch's ops (fp32, bf16 autocast)."""
import itertools, json, sys
import torch
sys.path.insert(0, ".")
from benchmarks.launch_options import launch_options
from benchmarks.norm_kernels import time_mlp_calls
from benchmarks.ssd_kernels import time_calls
from models import time_mlp_triton as k
dev = torch.device("cuda")
rows = []
variants = [None] + [dict(ROWS=r, BLOCK_N=n, BLOCK_K=bk, num_warps=w) for r, n, bk, w in itertools.product((16, 32), (32, 64), (32, 64), (2, 4, 8))]
for dtype in (torch.float32, torch.bfloat16):
    t = time_calls(*time_mlp_calls(120000, dtype, fused=False), dev)
    print(f"| PyTorch | {str(dtype)[6:]} | - | {t['fwd_ms']:.4f} | {t['fwd_bwd_ms']:.4f} | {len(t['kernels'])} kernels |", flush=True)
    rows.append(dict(kind="torch", dtype=str(dtype)[6:], fwd=t["fwd_ms"], fb=t["fwd_bwd_ms"]))
    for v in (variants if dtype == torch.float32 else variants[:1]):
        opts = None if v is None else {name: dict(v) for name in k.LAUNCH_OPTIONS}
        try:
            with launch_options(k, opts):
                t = time_calls(*time_mlp_calls(120000, dtype), dev)
        except Exception as e:
            print(f"| fused | {v} | error {type(e).__name__}: {str(e)[:100]} |", flush=True); continue
        ker = {n: 1e3 * t["kernels"].get(n, float("nan")) for n in k.LAUNCH_OPTIONS}
        print(f"| fused | {str(dtype)[6:]} | {v or 'shipped'} | {t['fwd_ms']:.4f} | {t['fwd_bwd_ms']:.4f} | {ker} |", flush=True)
        rows.append(dict(kind="fused", dtype=str(dtype)[6:], opts=v, fwd=t["fwd_ms"], fb=t["fwd_bwd_ms"], kernels=ker))
json.dump(rows, open(sys.argv[1], "w"), indent=1)

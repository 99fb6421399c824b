"""What stays allocated when the benchmark starts its next row (memory snapshot), with
the capture variant named by CAPTURE (mgc: shipped; owner; shared)."""
import collections, gc, os, sys
import torch
sys.path.insert(0, "."); sys.path.insert(0, ".gpu_data")
from benchmarks import benchmark, measure

mode = os.environ.get("CAPTURE", "mgc")
if mode in ("owner", "shared"):
    import own_capture; own_capture.install(mode)
SNAPSHOT = os.environ.get("SNAPSHOT") == "1"
if SNAPSHOT:
    torch.cuda.memory._record_memory_history(max_entries=400000, context="all", stacks="all")
real_reset = measure.reset_peak_memory
rows = [0]

def reset(device):
    gc.collect()
    if device.type == "cuda":
        rows[0] += 1
        torch.cuda.synchronize()
        alloc = torch.cuda.memory_allocated(device) / 2**30
        print(f"[residue:{mode}] row {rows[0]} start: allocated {alloc:.3f} GiB", flush=True)
        if alloc > 0.01 and SNAPSHOT:
            snap = torch.cuda.memory._snapshot()
            groups = collections.Counter(); n = collections.Counter()
            for seg in snap["segments"]:
                for blk in seg["blocks"]:
                    if blk["state"] != "active_allocated":
                        continue
                    names = [f["name"] for f in blk.get("frames", [])]
                    keep = [x for x in names if "lloc" not in x][:8]
                    key = (str(seg.get("segment_pool_id")), " < ".join(keep))
                    groups[key] += blk["size"]; n[key] += 1
            for key, size in groups.most_common(12):
                print(f"[snapshot] {size/2**20:.1f} MiB in {n[key]} blocks pool={key[0]}: {key[1][:700]}", flush=True)
    real_reset(device)

measure.reset_peak_memory = reset
sys.exit(benchmark.main(sys.argv[1:]))

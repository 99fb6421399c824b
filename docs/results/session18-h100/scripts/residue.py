"""Scratch: what stays allocated on the GPU when the benchmark starts its next row."""
import collections, gc, sys
import torch
sys.path.insert(0, ".")
from benchmarks import benchmark, measure

real_reset = measure.reset_peak_memory

def reset(device):
    gc.collect()
    if device.type == "cuda":
        alloc = torch.cuda.memory_allocated(device) / 2**30
        groups = collections.Counter()
        for obj in gc.get_objects():
            try:
                if torch.is_tensor(obj) and obj.is_cuda:
                    groups[(tuple(obj.shape), str(obj.dtype))] += obj.untyped_storage().nbytes()
            except Exception:
                pass
        total = sum(groups.values()) / 2**30
        print(f"[residue] allocated {alloc:.3f} GiB at row start; live tensors found by gc {total:.3f} GiB", flush=True)
        for (shape, dtype), nbytes in groups.most_common(12):
            print(f"[residue]   {shape} {dtype} {nbytes / 2**20:.1f} MiB", flush=True)
    real_reset(device)

measure.reset_peak_memory = reset
sys.exit(benchmark.main(sys.argv[1:]))

"""Residue after trainings with graphed losses (tiny model), per capture variant."""
import gc, sys, pickle, collections, os
import torch, torch.nn.functional as F
from torch import nn
sys.path.insert(0, "."); sys.path.insert(0, ".gpu_data")
from recbole.data.interaction import Interaction
from pipeline.cuda_graphs import GraphedTrainingLoss

mode = sys.argv[1]
if mode in ("owner", "shared"):
    import own_capture; own_capture.install(mode)

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 256); self.b = nn.Linear(256, 3000)
    def calculate_loss(self, inter):
        return F.cross_entropy(self.b(torch.relu(self.a(inter["x"]))), inter["y"])

def trial(seed):
    torch.manual_seed(seed)
    model = Tiny().cuda(); opt = torch.optim.Adam(model.parameters())
    graphed = GraphedTrainingLoss(model)
    losses = []
    for b in (128, 256, 384, 512):
        for _ in range(3):
            inter = Interaction({"x": torch.randn(b, 64, device="cuda"), "y": torch.randint(0, 3000, (b,), device="cuda")})
            loss = graphed(inter); opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
    # eager reference of the same steps for correctness of the variant
    torch.manual_seed(seed)
    ref = Tiny().cuda(); ropt = torch.optim.Adam(ref.parameters()); rl = []
    for b in (128, 256, 384, 512):
        for _ in range(3):
            inter = Interaction({"x": torch.randn(b, 64, device="cuda"), "y": torch.randint(0, 3000, (b,), device="cuda")})
            l = ref.calculate_loss(inter); ropt.zero_grad(); l.backward(); ropt.step(); rl.append(l.item())
    diff = max(abs(a - b) for a, b in zip(losses, rl))
    torch.cuda.synchronize()
    return diff

def mib():
    gc.collect(); torch.cuda.synchronize()
    return torch.cuda.memory_allocated() / 2**20

if mode == "snapshot":
    torch.cuda.memory._record_memory_history(max_entries=200000, context="all", stacks="all")
print(f"[{mode}] start {mib():.1f} MiB")
for t in range(3):
    d = trial(t)
    print(f"[{mode}] after trial {t}: {mib():.1f} MiB allocated; max |loss graphed - eager| {d:.2e}")
if mode == "snapshot":
    snap = torch.cuda.memory._snapshot()
    groups = collections.Counter(); n = collections.Counter()
    for seg in snap["segments"]:
        for blk in seg["blocks"]:
            if blk["state"] != "active_allocated":
                continue
            names = [f["name"] for f in blk.get("frames", [])]
            keep = [x for x in names if "Allocator" not in x and "alloc" not in x.lower()][:6]
            key = (seg.get("segment_pool_id"), seg.get("stream"), " < ".join(keep))
            groups[key] += blk["size"]; n[key] += 1
    for key, size in groups.most_common(20):
        print(f"[snapshot] {size/2**20:.1f} MiB in {n[key]} blocks pool={key[0]} stream={key[1]}: {key[2][:600]}")
    with open(os.path.join(os.environ.get("OUT", "."), "snapshot.pickle"), "wb") as f:
        pickle.dump(snap, f)
torch._C._cuda_clearCublasWorkspaces()
print(f"[{mode}] after clearCublasWorkspaces: {mib():.1f} MiB")

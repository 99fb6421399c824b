"""Median CPU training step of one benchmark row on the benchmark's workload, and with --stack
its op table by input shape; KEEP=1 keeps freed host memory. Run from the repository root."""
import sys, time, argparse, os, torch
sys.path.insert(0, os.getcwd())
from pipeline.host_memory import keep_freed_memory
if os.environ.get("KEEP"): print("kept", keep_freed_memory())
from benchmarks import benchmark as bm
from torch.profiler import profile, ProfilerActivity

p = argparse.ArgumentParser()
p.add_argument("--model", default="TiM4Rec:torch:fp32")
p.add_argument("--steps", type=int, default=10)
p.add_argument("--stack", action="store_true")
p.add_argument("--workload", default="cpu")
a = p.parse_args()
args = bm.build_parser().parse_args(["--device", "cpu", "--quick", "--out", "/tmp/step-profile-out"])
work = bm.make_workload(a.workload, True, None)
B = bm.Benchmark(args, work, torch.device("cpu"))
v = bm.parse_models(a.model, torch.device("cpu"))[0]
state = B.build(v, {})
batches = [b for _, b in zip(range(4), state["train"])]
for b in batches[:2]:
    B.train_step(state, b)
ts = []
for i in range(a.steps):
    t = time.perf_counter(); B.train_step(state, batches[i % 4]); ts.append(time.perf_counter() - t)
ts.sort(); print("step ms median", 1000 * ts[len(ts)//2], "min", 1000 * ts[0])
print("done")
if a.stack:
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for i in range(3):
            B.train_step(state, batches[i])
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=45, max_name_column_width=30, max_shapes_column_width=70))

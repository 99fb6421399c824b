import sys, os, time, torch
sys.path.insert(0, os.getcwd())
from pipeline.host_memory import keep_freed_memory
if os.environ.get("KEEP"): print("kept", keep_freed_memory())
from benchmarks import benchmark as bm
args = bm.build_parser().parse_args(["--device", "cpu", "--quick", "--out", "/tmp/s21/out"])
work = bm.make_workload("amazon-beauty", True, None)
B = bm.Benchmark(args, work, torch.device("cpu"))
v = bm.parse_models(sys.argv[1], torch.device("cpu"))[0]
state = B.build(v, {})
def rss(): return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**30
out = []
for i, b in enumerate(state["train"]):
    if i >= int(sys.argv[2]): break
    B.train_step(state, b); out.append("%.2f" % rss())
print("rss GiB per step", " ".join(out))
t = time.perf_counter(); state["trainer"].evaluate(state["valid"], load_best_model=False)
print("after eval %.2f GiB, eval %.1f s" % (rss(), time.perf_counter() - t))
for i, b in enumerate(state["train"]):
    if i >= 5: break
    B.train_step(state, b)
print("after 5 more steps %.2f GiB" % rss())

R=$OUT; mkdir -p $R
source tools/offline_gpu_setup.sh .wheels > $R/setup.log 2>&1
export PYTHONPATH=$PWD:$PYTHONPATH
export TRITON_CACHE_DIR=/tmp/tc10
nvidia-smi --query-gpu=name --format=csv,noheader > $R/gpu.txt
python -c "import torch,inspect;import torch.cuda.graphs as g;s=inspect.getsource(g.make_graphed_callables);print(torch.__version__);print([l.strip() for l in s.splitlines() if 'Stream(' in l or 'stream=' in l])" > $R/torch_facts.txt 2>&1
grep -c clearCublasWorkspacesForStream $(python -c "import torch,os;print(os.path.dirname(torch.__file__))")/lib/libtorch_cuda.so >> $R/torch_facts.txt 2>&1
for m in mgc snapshot owner shared; do timeout 120 python .gpu_data/diag_tiny.py $m > $R/tiny-$m.log 2>&1; echo rc=$? >> $R/tiny-$m.log; done
for m in mgc owner; do CAPTURE=$m timeout 200 python .gpu_data/diag_bench.py --quick --epoch-steps 20 --models TiM4Rec:triton:bf16:graph,TiM4Rec:triton:fp32:graph --out $R/bench-$m > $R/bench-$m.log 2>&1; echo rc=$? >> $R/bench-$m.log; done
cat $R/gpu.txt $R/torch_facts.txt; grep -h "^\[" $R/tiny-*.log | grep -v snapshot; grep -h "snapshot\]" $R/tiny-snapshot.log | head -8 | cut -c1-400
for m in mgc owner; do grep -h "residue\|snapshot\]\|ms/step\|^|\|rc=" $R/bench-$m.log | cut -c1-400; done

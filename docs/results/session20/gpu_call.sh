# The device call prepared in the twentieth session (2026-12-08) and never run: no GPU was
# lent. Run from the repository root on the GPU machine, wheels carried (.wheels,
# tools/offline_gpu_setup.sh) and the decompressed Amazon Beauty file under .gpu_data/.
# Writes everything under $OUT; prints a short table last.
R=$OUT; mkdir -p $R
source tools/offline_gpu_setup.sh .wheels > $R/setup.log 2>&1
export PYTHONPATH=$PWD:$PYTHONPATH
nvidia-smi --query-gpu=name --format=csv,noheader > $R/gpu.txt
# 1. The bf16x6 kernels against float64 at every sweep configuration (and the rest).
export TRITON_CACHE_DIR=/tmp/tc-tests
timeout 90 python -m pytest -q -m gpu tests/test_products.py > $R/gpu-tests-products.txt 2>&1; echo rc=$? >> $R/gpu-tests-products.txt
# 2. Every launch configuration of the products; dw's default is cuBLAS, so its row reads
#    cuBLAS against the bf16x6 candidates.
timeout 110 python -m benchmarks.linear_products --kernel triton --sweep > $R/sweep.log 2>&1; echo rc=$? >> $R/sweep.log
# 3. The graphed fp32 step with the sweep's winners (bench_with_sweep.py), then without.
export TRITON_CACHE_DIR=/tmp/tc-bench-new
timeout 75 python docs/results/session20/bench_with_sweep.py --repeat 1 --time-budget 60 --out $R/bench-new --models TiM4Rec:triton:fp32:graph > $R/bench-new.log 2>&1; echo rc=$? >> $R/bench-new.log
export TRITON_CACHE_DIR=/tmp/tc-bench-base
timeout 75 python -m benchmarks.benchmark --repeat 1 --time-budget 60 --out $R/bench-base --models TiM4Rec:triton:fp32:graph > $R/bench-base.log 2>&1; echo rc=$? >> $R/bench-base.log
# 4. Amazon Beauty end to end, all positions + CUDA graphs, on an empty Triton cache.
export TRITON_CACHE_DIR=/tmp/tc-beauty
timeout 90 python run.py --config config/config4beauty_64d.yaml --train_positions=all --time_encoding=causal --train_cuda_graph=True --data_path=.gpu_data/dataset --checkpoint_dir=/tmp/saved > $R/beauty-graphs.log 2>&1; echo rc=$? >> $R/beauty-graphs.log
cat $R/gpu.txt; tail -3 $R/gpu-tests-products.txt | cut -c1-300
grep "^|\|rc=" $R/sweep.log
grep -h "compiled\|epoch 0 \|Error\|rc=" $R/beauty-graphs.log | cut -c1-200; grep -A1 "test result" $R/beauty-graphs.log | cut -c1-250
echo NEW; grep "overrides" $R/bench-new.log | cut -c1-600; grep "^|" $R/bench-new.log | cut -c1-230
echo BASE; grep "^|" $R/bench-base.log | cut -c1-230

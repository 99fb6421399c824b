R=$OUT; mkdir -p $R
source tools/offline_gpu_setup.sh .wheels > $R/setup.log 2>&1
export PYTHONPATH=$PWD:$PYTHONPATH
export TRITON_CACHE_DIR=/tmp/tc11
nvidia-smi --query-gpu=name --format=csv,noheader > $R/gpu.txt
timeout 240 python -m pytest -q -s -m gpu tests/test_sequence_batches.py tests/test_recommend.py -p no:cacheprovider > $R/gpu_tests.txt 2>&1; echo rc=$? >> $R/gpu_tests.txt
timeout 330 python .gpu_data/diag_bench.py --repeat 1 --time-budget 290 --models TiM4Rec:triton:fp32:graph,TiM4Rec:triton:bf16:graph,TiM4Rec:triton:fp32,SASRec,SSD4Rec,Mamba4Rec --out $R/bench > $R/bench.log 2>&1; echo rc=$? >> $R/bench.log
cat $R/gpu.txt; grep -h "\[gpu\]\|passed\|failed\|rc=" $R/gpu_tests.txt | tail -12
grep -h "residue\|ms/step\|^|\|rc=" $R/bench.log | cut -c1-300

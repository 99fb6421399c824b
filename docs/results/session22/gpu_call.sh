# Session 22's first device call: session 20's prepared call, then the CUDA-graph GPU tests
# (pipeline/cuda_graphs.py's warm-up loop changed this session).
bash docs/results/session20/gpu_call.sh
source tools/offline_gpu_setup.sh .wheels > /dev/null 2>&1
export PYTHONPATH=$PWD:$PYTHONPATH TRITON_CACHE_DIR=/tmp/tc-tests
timeout 100 python -m pytest -q -m gpu tests/test_sequence_batches.py tests/test_layer_norm.py -k graph > $OUT/gpu-tests-graphs.txt 2>&1; echo rc=$? >> $OUT/gpu-tests-graphs.txt
echo GRAPH TESTS; tail -2 $OUT/gpu-tests-graphs.txt | cut -c1-300

R=$OUT; mkdir -p $R
source tools/offline_gpu_setup.sh .wheels > $R/setup.log 2>&1
export PYTHONPATH=$PWD:$PYTHONPATH
export TRITON_CACHE_DIR=/tmp/tc11
T=tests/test_sequence_batches.py::test_graphed_loss_leaves_one_stream_of_cublas_workspaces
timeout 120 python -m pytest -q -s -m gpu $T -p no:cacheprovider > $R/test-new.txt 2>&1; echo rc=$? >> $R/test-new.txt
cp pipeline/cuda_graphs.py /tmp/new_cuda_graphs.py; cp .gpu_data/old_cuda_graphs.py pipeline/cuda_graphs.py
timeout 120 python -m pytest -q -s -m gpu $T -p no:cacheprovider > $R/test-old.txt 2>&1; echo rc=$? >> $R/test-old.txt
cp /tmp/new_cuda_graphs.py pipeline/cuda_graphs.py
for f in new old; do echo "== $f"; grep -h "\[gpu\]\|passed\|failed\|assert \|rc=" $R/test-$f.txt | tail -6; done

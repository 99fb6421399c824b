# The first device call for the next session with a GPU, before session 20's prepared call
# (docs/results/session20/gpu_call.sh): the whole GPU test suite, which this session's
# changes (FP fusion pinned at every launch, the CUDA-graph warm-up loop) have not met on a
# device. ~3 minutes (143 s in the nineteenth session). Run from the repository root with
# carry=[".wheels", ".gpu_data"]; writes under $OUT, prints the summary last.
source tools/offline_gpu_setup.sh .wheels > $OUT/setup.log 2>&1
export PYTHONPATH=$PWD:$PYTHONPATH TRITON_CACHE_DIR=/tmp/tc-suite
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
timeout 500 python -m pytest -q -m gpu tests/ > $OUT/gpu-suite.txt 2>&1; echo rc=$? >> $OUT/gpu-suite.txt
grep -E "^(FAILED|ERROR)" $OUT/gpu-suite.txt | cut -c1-200; tail -2 $OUT/gpu-suite.txt

#!/usr/bin/env bash
# Install carried wheels on an offline GPU machine that already has torch + triton.
#
# On a networked machine (same Python version as the GPU machine, here 3.12):
#   pip download --no-deps -d .wheels recbole==1.2.0 colorlog==4.7.2 colorama==0.4.4 texttable thop
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .wheels "pandas>=2.2,<3" pytz tzdata
#   MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
#       pip wheel --no-deps --no-build-isolation -w .wheels mamba-ssm==2.3.2.post1
# Then, on the GPU machine:  source tools/offline_gpu_setup.sh [.wheels]
wheels="${1:-.wheels}"
site="${TIM4REC_SITE:-/tmp/tim4rec-site}"
python3 -m pip install --quiet --no-index --no-deps --target "$site" "$wheels"/*.whl
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"

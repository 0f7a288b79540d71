#!/usr/bin/env bash
# The prepared GPU check (one command on a machine with a CUDA GPU): builds pyswitch with its
# CUDA backend from the PyPI toolkit wheels, runs the C++ backend-ops test (every op on the GPU
# against the CPU reference), the Python tests in tests/gpu, and benchmarks/bench_cuda.py against
# torch CUDA and cuBLAS. Results (logs and bench_cuda.json) go to $PYSWITCH_GPU_OUT
# (default build/gpu-results). Needs torch with CUDA for the benchmark's baselines. About
# 5 minutes on an H200, most of it the build.
#
# PYSWITCH_GPU_PREBUILT=1 skips the build: pyswitch is importable as it is and
# PYSWITCH_TESTS_BIN names a pyswitch_tests binary built with -DPYSWITCH_ENABLE_CUDA=ON.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
out=${PYSWITCH_GPU_OUT:-$root/build/gpu-results}
mkdir -p "$out"
python=${PYTHON:-python3}
# The routing properties run derandomized with 200 examples each, as in CI.
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
start=$SECONDS
step() { printf '\n==== [%4ds] %s\n' $((SECONDS - start)) "$*"; }

if [[ "${PYSWITCH_GPU_PREBUILT:-0}" != 1 ]]; then
  step "toolkit wheels and the build (CUDA on)"
  "$python" -m pip install -q "cuda-toolkit[nvcc,cudart,cublas,cccl]==13.0.3.0" \
    "nvidia-nccl-cu13==2.30.7" "onednn-devel-cpu-gomp==2023.2.0" scikit-build-core \
    "pybind11>=2.12" ninja cmake
  eval "$("$python" .ci/cuda_toolkit.py)"
  prefix=$("$python" -c "import sys; print(sys.prefix)")
  "$python" -m pip install -q --no-build-isolation -e ".[test,cuda]" \
    -Ccmake.define.PYSWITCH_ENABLE_CUDA=ON -Cbuild-dir=build/gpu-python
  cmake -S . -B build/gpu -G Ninja -DPYSWITCH_BUILD_TESTS=ON -DPYSWITCH_ENABLE_CUDA=ON \
    -DPYSWITCH_ENABLE_MPI=OFF -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
  cmake --build build/gpu --target pyswitch_tests
  tests_bin=$root/build/gpu/cpp/tests/pyswitch_tests
else
  tests_bin=${PYSWITCH_TESTS_BIN:?PYSWITCH_GPU_PREBUILT=1 needs PYSWITCH_TESTS_BIN}
fi

step "the GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
"$python" -c "import pyswitch; print('pyswitch.cuda:', pyswitch.cuda.is_available(), \
pyswitch.cuda.device_info(0), pyswitch.cuda.versions())"

status=0
step "C++: the CUDA host side, the shared device math, every backend op on the GPU vs the CPU"
for group in cuda_ device_math_ backend_ops_; do
  "$tests_bin" "$group" 2>&1 | tee "$out/cpp_$group.txt" || status=1
done

step "Python: tests/gpu (route, layers, device arrays) and the device tests"
"$python" -m pytest -q -p no:cacheprovider tests/gpu tests/test_device.py 2>&1 \
  | tee "$out/pytest_gpu.txt" || status=1

step "benchmark: bench_cuda.py"
"$python" benchmarks/bench_cuda.py --json "$out/bench_cuda.json" 2>&1 \
  | tee "$out/bench_cuda.txt" || status=1

step "done (status $status); results in $out"
exit $status

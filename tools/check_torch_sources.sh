#!/usr/bin/env bash
# Syntax-check the torch-facing entry points (csrc/torch/*.cpp) on a machine with a CPU-only torch
# and nvcc but no GPU: the CPU wheel lacks one generated CUDA header, which we stub. This catches
# C++ errors before the GPU build; it does not replace it.
# Usage: tools/check_torch_sources.sh [files...]   (default: every csrc/torch/*.cpp)
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
stub=$(mktemp -d); trap 'rm -rf "$stub"' EXIT
mkdir -p "$stub/c10/cuda/impl"; : > "$stub/c10/cuda/impl/cuda_cmake_macros.h"
ti=$(python3 -c "import torch.utils.cpp_extension as c; print(' '.join('-I'+p for p in c.include_paths()))")
py=$(python3 -c "import sysconfig; print('-I' + sysconfig.get_paths()['include'])")
cuda_home=${CUDA_HOME:-/usr/local/cuda}; [ -f "$cuda_home/include/cuda_runtime.h" ] || cuda_home=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
cuda_inc=$cuda_home/include
files=("$@"); [ ${#files[@]} -gt 0 ] || files=("$top"/csrc/torch/*.cpp)
rc=0
for f in "${files[@]}"; do
  echo "checking $f"
  g++ -std=c++20 -w -fsyntax-only $ti "$py" -I"$stub" -I"$cuda_inc" -I"$top/csrc/torch" -I"$top/csrc/kernels" \
    -DTORCH_EXTENSION_NAME=_C -DSQK_HAS_SM80=1 -DSQK_HAS_SM90=1 -DSQK_HAS_COMMON=1 "$f" || { echo "FAILED: $f"; rc=1; }
done
exit $rc

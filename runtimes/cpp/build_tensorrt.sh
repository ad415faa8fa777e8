#!/usr/bin/env bash
# Build stn_runtime with the TensorRT backend and classify images with a plan (GPU hosts only).
#
#   runtimes/cpp/build_tensorrt.sh MODEL.plan IMAGE.pgm... [-- extra stn_classify options]
#
# Needs: the TensorRT SDK (headers + libnvinfer; set TensorRT_ROOT if not in a system path),
# the CUDA toolkit, cmake >= 3.18, a C++17 compiler, and MODEL.plan.json beside the plan
# (stn-deploy export writes it). OpenVINO is added too when the openvino wheel is importable.
# STATUS: written for benchmarks/gpu.sh; it has NOT been run (the development machine has no GPU
# and no TensorRT SDK).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 MODEL.plan IMAGE.pgm... [-- stn_classify options]" >&2
  exit 2
fi
here="$(cd "$(dirname "$0")" && pwd)"
build="${STN_TRT_BUILD_DIR:-$here/build/tensorrt}"
args=(-S "$here" -B "$build" -DCMAKE_BUILD_TYPE=Release -DSTN_WITH_TENSORRT=ON)
[[ -n "${TensorRT_ROOT:-}" ]] && args+=("-DTensorRT_ROOT=$TensorRT_ROOT")
if ov_dir="$(python3 -c 'import openvino, os; print(os.path.join(os.path.dirname(openvino.__file__), "cmake"))' 2>/dev/null)"; then
  args+=("-DOpenVINO_DIR=$ov_dir")
else
  args+=(-DSTN_WITH_OPENVINO=OFF)
fi
cmake "${args[@]}"
cmake --build "$build" -j "$(nproc)"

plan="$1"; shift
images=(); extra=()
while [[ $# -gt 0 ]]; do
  if [[ "$1" == "--" ]]; then shift; extra=("$@"); break; fi
  images+=("$1"); shift
done
"$build/stn_classify" "$plan" "${images[@]}" --top-k 3 "${extra[@]}"
"$build/stn_classify" "$plan" "${images[0]}" --bench 1000 "${extra[@]}"

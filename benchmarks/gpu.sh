#!/usr/bin/env bash
# The comparison on a GPU host: TensorRT FP32/FP16/INT8 plans, ONNX Runtime CUDA (and its
# TensorRT provider when present), PyTorch CUDA, written as the same JSON/CSV/markdown/PNG as
# `stn-deploy bench` (schema in stn_deploy/report.py).
#
# NOT RUN: it was written on a 2-core CPU machine without a GPU or TensorRT. It needs an NVIDIA
# GPU with its driver, `pip install -e '.[trt]'` ('.[trt-cu12]' with a CUDA 12 torch), then
# onnxruntime-gpu alone in place of onnxruntime (`pip uninstall -y onnxruntime onnxruntime-gpu
# && pip install onnxruntime-gpu`: the two share one module folder), and the data.
#
#   benchmarks/gpu.sh CHECKPOINT [DATA_DIR]     # DATA_DIR: imagefolder (e.g. the CIFAR-10 JPEG copy)
#
# Environment: OUT (default benchmarks/results/gpu), BATCH_SIZES (1,8,64,256),
# ITERATIONS (500), WARMUP (50), DATASET (imagefolder when DATA_DIR is given).
set -euo pipefail

CKPT=${1:?usage: benchmarks/gpu.sh CHECKPOINT [DATA_DIR]}
DATA_DIR=${2:-}
OUT=${OUT:-benchmarks/results/gpu}
BATCH_SIZES=${BATCH_SIZES:-1,8,64,256}
ITERATIONS=${ITERATIONS:-500}
WARMUP=${WARMUP:-50}
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
    || { echo "gpu.sh: no NVIDIA GPU (nvidia-smi failed)" >&2; exit 1; }
why=$(python -c "from stn_deploy.backends import unavailable_reason as u; print(u('trt') or '')")
[[ -z "$why" ]] || { echo "gpu.sh: trt cannot run: $why" >&2; exit 1; }
# Where these figures come from: time, commit, CPU and its ISA, library versions.
python "$(dirname "$0")/_provenance.py" "$OUT/provenance.json"

DATA_ARGS=()
if [[ -n "$DATA_DIR" ]]; then
    DATA_ARGS=(--dataset "${DATASET:-imagefolder}" --data-dir "$DATA_DIR")
fi

# TensorRT plans (the INT8 plan is built from the calibrated QDQ graph; calibration images
# come from the training split of DATA_DIR; digits needs none).
for p in fp32 fp16 int8; do
    stn-deploy export "$CKPT" --format trt --precision "$p" --with-theta \
        ${DATA_DIR:+--data-dir "$DATA_DIR"} --trt-profile 1,32,256 --out "$OUT/model-$p.plan"
done

# ONNX Runtime's GPU providers, asked through stn-deploy's own probe (it also names an
# onnxruntime + onnxruntime-gpu clash, where the CPU wheel hides the GPU providers).
reason() {
    python -c "import sys; from stn_deploy.backends import unavailable_reason as u; r = u(sys.argv[1]); print(r or '')" "$1"
}
why=$(reason onnxruntime-cuda)
if [[ -n "$why" ]]; then
    echo "gpu.sh: onnxruntime-cuda cannot run: $why" >&2
    exit 1
fi
BACKENDS=torch,onnxruntime-cuda,trt
why=$(reason onnxruntime-trt)
if [[ -z "$why" ]]; then
    BACKENDS=$BACKENDS,onnxruntime-trt
else
    echo "gpu.sh: leaving out onnxruntime-trt: $why" >&2
fi

# The checkpoint first: PyTorch (CUDA) is the reference for agreement. ONNX Runtime's CUDA/TRT
# providers run the checkpoint through bench's own temporary opset-17 ONNX export (with theta).
stn-deploy bench "$CKPT" "$OUT"/model-{fp32,fp16,int8}.plan \
    --backend "$BACKENDS" --device cuda:0 \
    --batch-sizes "$BATCH_SIZES" --iterations "$ITERATIONS" --warmup "$WARMUP" \
    "${DATA_ARGS[@]}" \
    --json "$OUT/gpu.json" --csv "$OUT/gpu.csv" --markdown "$OUT/gpu.md" --plot "$OUT/gpu.png"

# The C++ TensorRT backend (runtimes/cpp): build it, classify real test images with the FP32
# plan and time batch 1. Inputs are written as PPM/PGM from the checkpoint's own test split.
PPM_DIR="$OUT/ppm"
mkdir -p "$PPM_DIR"
python - "$CKPT" "$PPM_DIR" ${DATA_DIR:+"$DATA_DIR"} <<'PY'
import sys

from stn_deploy.checkpoint import load_checkpoint
from stn_deploy.data import load_dataset
from stn_deploy.pnm import write_pnm

config = load_checkpoint(sys.argv[1]).config
data_dir = sys.argv[3] if len(sys.argv) > 3 else None
test = load_dataset(config.dataset, data_dir, image_size=config.image_size,
                    distort=config.distort).test
ext = "pgm" if config.in_channels == 1 else "ppm"
for i in range(8):
    write_pnm(f"{sys.argv[2]}/{i}.{ext}", test.images[i].permute(1, 2, 0).numpy())
PY
# build_tensorrt.sh prints the top-3 of every image, then p50/p99 of 1,000 batch-1 runs.
runtimes/cpp/build_tensorrt.sh "$OUT/model-fp32.plan" "$PPM_DIR"/* | tee "$OUT/cpp_tensorrt.txt"

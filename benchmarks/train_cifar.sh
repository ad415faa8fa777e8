#!/usr/bin/env bash
# Trains the 145,104-parameter model on CIFAR-10 (JPEG copy) with one recipe and writes
# benchmarks/results/train_cifar_<recipe>_<epochs>ep.json (final test accuracy, wall time per
# epoch). A stopped run continues with --resume when started again with the same arguments.
# Usage: benchmarks/train_cifar.sh seed|improved EPOCHS [DATA_DIR]
set -euo pipefail
recipe=${1:?recipe: seed or improved}
epochs=${2:?epochs}
data=${3:-$HOME/.cache/stn-deploy/cifar10-jpeg}
here=$(cd "$(dirname "$0")/.." && pwd)
if [ ! -d "$data/train" ]; then
  mkdir -p "$data"
  tar xzf "$here/../shared/data/cifar10-jpeg.tar.gz" -C "$data"
fi
out="$here/runs/cifar-$recipe-${epochs}ep"
resume=()
[ -f "$out/last.pt" ] && resume=(--resume)
stn-deploy train --dataset imagefolder --data-dir "$data" --recipe "$recipe" \
  --epochs "$epochs" --out "$out" "${resume[@]}" --quiet
python "$here/benchmarks/summarize_training.py" "$out/metrics.json" \
  "$here/benchmarks/results/train_cifar_${recipe}_${epochs}ep.json" --dataset "CIFAR-10 (JPEG copy)"

#!/usr/bin/env bash
# Trains the 145,104-parameter model on CIFAR-10 (JPEG copy) with one recipe and writes
# benchmarks/results/train_cifar_<recipe>_<epochs>ep[_<tag>].{json,md} (final test accuracy, STN
# health, wall time per epoch, and where it ran: benchmarks/_provenance.py). A stopped run continues with --resume when started again with
# the same arguments. TAG names a variant whose extra train options follow it.
# Usage: benchmarks/train_cifar.sh seed|improved EPOCHS [TAG [TRAIN OPTIONS...]]
#   e.g. benchmarks/train_cifar.sh improved 130 pose --rts-augment 0.25 --stn-pose-loss 1
# Data: $CIFAR_DIR (default ~/.cache/stn-deploy/cifar10-jpeg, unpacked from ../shared if absent).
set -euo pipefail
recipe=${1:?recipe: seed or improved}
epochs=${2:?epochs}
tag=${3:-}
shift $(( $# < 3 ? $# : 3 ))
data=${CIFAR_DIR:-$HOME/.cache/stn-deploy/cifar10-jpeg}
here=$(cd "$(dirname "$0")/.." && pwd)
if [ ! -d "$data/train" ]; then
  mkdir -p "$data"
  tar xzf "$here/../shared/data/cifar10-jpeg.tar.gz" -C "$data"
fi
out="$here/runs/cifar-$recipe-${epochs}ep${tag:+-$tag}"
resume=()
[ -f "$out/last.pt" ] && resume=(--resume)
stn-deploy train --dataset imagefolder --data-dir "$data" --recipe "$recipe" \
  --epochs "$epochs" --out-dir "$out" "${resume[@]}" --quiet "$@"
python "$here/benchmarks/summarize_training.py" "$out/metrics.json" \
  "$here/benchmarks/results/train_cifar_${recipe}_${epochs}ep${tag:+_$tag}.json" \
  --dataset "CIFAR-10 (JPEG copy)"

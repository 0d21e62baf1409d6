#!/usr/bin/env bash
# Fresh machine -> installed umtrain -> offline demo corpus -> a tiny UltraMem model trained with TP=2 on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
[ -f data/demo/blend.txt ] || umtrain demo-data --out data/demo
umtrain train --config configs/demo.yaml --nproc-per-node 2 "$@"

#!/usr/bin/env bash
# On a machine with a GPU, from a fresh clone: install, then measure the embed stage and validation training
# against raw loops on the same GPU, and the Dask placement of embed tasks. Result: benchmarks/results/gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/.."
make install
.venv/bin/python -m benchmarks.gpu_check --out benchmarks/results/gpu_check.json "$@"

#!/usr/bin/env bash
# Run the JAX-vs-PyTorch benchmark suite once and write benchmarks/results/*_<device>*.json/.png
# (names: benchmarks/results/README.md).
#
#   bash benchmarks/run_all.sh --device gpu     # one GPU (sized for < 8 min on one H200; untested)
#   bash benchmarks/run_all.sh --device cpu     # this project's 2-core CPU machines (~1 h)
#
# Needs the torch extra (pip install -e '.[torch]'). On a GPU machine: the CUDA jaxlib of the
# pinned jax (pip install -e '.[cuda12]'); the JAX-vs-torch scripts also need a CUDA build of
# torch==2.13.0, which the project does not install (it pins the CPU wheel) — without it they exit
# with a clear message and the JAX-only conv_block timing of every per-sample conv implementation
# (winograd, grouped, map, conv_map) still runs first. Run from the repository root.
set -euo pipefail
DEVICE=cpu
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    *) echo "usage: $0 [--device cpu|gpu]" >&2; exit 2 ;;
  esac
done
[[ "$DEVICE" == cpu || "$DEVICE" == gpu ]] || { echo "--device must be cpu or gpu" >&2; exit 2; }
TAG="_${DEVICE}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and torch share the accelerator's memory
run() { echo "+ $* (load: $(cut -d' ' -f1-3 /proc/loadavg))"; local t=$SECONDS; "$@"; echo "  took $((SECONDS - t)) s"; }
cd "$(dirname "$0")/.."

if [[ "$DEVICE" == gpu ]]; then  # JAX only: every per-sample conv implementation on the GPU
  run python -m benchmarks.conv_block --device gpu --impls winograd grouped map conv_map --breakdown --tag "$TAG"
fi
run python -m benchmarks.toy_step --device "$DEVICE" --repeats 10 --no-backward-count --tag "$TAG"
run python -m benchmarks.toy_step --device "$DEVICE" --sweep batch --loops closed --solvers rk4 --tag "$TAG"
if [[ "$DEVICE" == gpu ]]; then  # auto = grouped on GPU; winograd (batched GEMMs) the candidate beside it
  run python -m benchmarks.conv_step --device gpu --kinds open closed --solvers rk4 --impls auto winograd map \
      --checkpoints default 1 --tag "$TAG"
else  # the table of benchmarks/README.md: the default (winograd) and map against torch's fastest
  run python -m benchmarks.conv_step --device cpu --impls winograd map --torch-conv vmap \
      --repeats 3 --tag "$TAG"
  run python -m benchmarks.conv_step --device cpu --impls winograd map --torch-conv vmap \
      --repeats 3 --devices 2 --tag "${TAG}_devices2"
fi
run python -m benchmarks.conv_step --device "$DEVICE" --kinds open --solvers dopri5 --adjoints checkpoint \
    --tag "${TAG}_adaptive"
run python -m benchmarks.latent_flow_step --device "$DEVICE" --tag "$TAG"
if [[ "$DEVICE" == cpu ]]; then  # CPU-only studies (process RSS; torch variants on CPU tensors)
  run python -m benchmarks.conv_block --batch 64 --impls winograd map --breakdown --torch --skip-naive --tag "$TAG"
  run python -m benchmarks.memory
fi
echo "done: results in benchmarks/results/*${TAG}*.json"

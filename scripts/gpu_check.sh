#!/usr/bin/env bash
# One-command validation on a CUDA machine without internet, in under 8 minutes.
#
#   scripts/gpu_check.sh --build-wheels   on a CPU machine with a package index: wheels of every runtime
#                                         dependency except torch (the CUDA machine brings its CUDA torch)
#                                         into wheelhouse/, copied with the tree
#   scripts/gpu_check.sh                  on the CUDA machine: installs what is missing from wheelhouse/
#                                         (pip --no-index), runs the GPU-marked tests and the bf16 layer
#                                         benchmark next to DeepSpeed's MoE, writes gpu_check_results/summary.md
#
# Environment: PYTHON (default python3), WHEELHOUSE, GPU_CHECK_OUT. The wheels match the building machine's
# Python version and platform; the CUDA machine needs the same Python minor version.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELHOUSE:-$ROOT/wheelhouse}
OUT=${GPU_CHECK_OUT:-$ROOT/gpu_check_results}
RUNTIME_PACKAGES="deepspeed transformers tokenizers safetensors huggingface_hub pyyaml numpy pytest pytest-timeout"

if [[ "${1:-}" == "--build-wheels" ]]; then
    mkdir -p "$WHEELS"
    # Exact versions of this environment, minus torch and its CUDA/triton companions.
    "$PYTHON" -m pip freeze --exclude-editable | grep -viE '^(torch|nvidia-|triton|mpomoe)' > "$WHEELS/requirements.txt"
    "$PYTHON" -m pip wheel --no-deps -w "$WHEELS" -r "$WHEELS/requirements.txt"
    "$PYTHON" -c "import sys; print(f'{sys.version_info.major}.{sys.version_info.minor}')" > "$WHEELS/python_version"
    du -sh "$WHEELS"
    exit 0
fi

mkdir -p "$OUT"
SECONDS=0
"$PYTHON" - <<'PY' || { echo "gpu_check: needs torch with a visible CUDA device (nvidia-smi; a CUDA torch build)" >&2; exit 2; }
import torch
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
PY
if ! "$PYTHON" -c "import deepspeed, transformers, yaml, pytest, pytest_timeout" 2>/dev/null; then
    [[ -f "$WHEELS/requirements.txt" ]] || { echo "gpu_check: missing packages and no $WHEELS: run"\
        "'scripts/gpu_check.sh --build-wheels' on a machine with a package index and copy wheelhouse/" >&2; exit 2; }
    want=$(cat "$WHEELS/python_version"); have=$("$PYTHON" -c "import sys; print(f'{sys.version_info.major}.{sys.version_info.minor}')")
    [[ "$want" == "$have" ]] || { echo "gpu_check: wheels are for Python $want, this is $have" >&2; exit 2; }
    "$PYTHON" -m pip install --no-index --find-links "$WHEELS" $RUNTIME_PACKAGES
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset DS_ACCELERATOR

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/device.txt" 2>/dev/null \
    || "$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0))" > "$OUT/device.txt"
"$PYTHON" -c "import torch, deepspeed, transformers; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), deepspeed {deepspeed.__version__}, transformers {transformers.__version__}')" > "$OUT/versions.txt"

# 1. GPU-marked tests: bf16/fp16 Trainer steps on the GPU, collectives on CUDA tensors.
set +e
timeout 300 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests/gpu tests/test_parallel.py \
    --junitxml "$OUT/tests.xml" > "$OUT/tests.log" 2>&1
tests_rc=$?
# 2. One MoE layer in bf16 at GPT-2 widths, 1 GPU: MPOE next to DeepSpeed's MoE and plain experts.
timeout 150 "$PYTHON" benchmarks/layer.py --device cuda --ranks 1 --cells 8x8192 --variants mpoe ds ffn \
    --dtype bf16 --steps 3 --out "$OUT/layer.json" > "$OUT/layer.log" 2>&1
bench_rc=$?
set -e

{
    echo "# gpu_check results"
    echo
    echo "device: $(cat "$OUT/device.txt")"
    echo "software: $(cat "$OUT/versions.txt")"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo
    echo "## GPU-marked tests (exit $tests_rc)"
    echo
    tail -n 3 "$OUT/tests.log"
    echo
    echo "## Layer benchmark, bf16, 1 GPU (exit $bench_rc)"
    echo
    if [[ -f "$OUT/layer.md" ]]; then cat "$OUT/layer.md"; else tail -n 20 "$OUT/layer.log"; fi
    echo
    echo "wall time: ${SECONDS}s"
} > "$OUT/summary.md"
cat "$OUT/summary.md"
[[ $tests_rc -eq 0 && $bench_rc -eq 0 ]]

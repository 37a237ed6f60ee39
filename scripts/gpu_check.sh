#!/usr/bin/env bash
# One command for a CUDA machine: every trainer with AMP, torch.compile on and off, vs plain nnU-Net.
#
#   bash scripts/gpu_check.sh OUT_DIR [--wheels DIR] [--device cpu] [--tiny] [other scripts/gpu_check.py options]
#
# Needs python with torch (CUDA build for a real check). If nnU-Net is not importable it is installed offline
# from --wheels DIR (made by scripts/gpu_wheels.sh) into OUT_DIR/venv, a virtual environment that sees the
# system's torch (--system-site-packages). This repository is used in place (PYTHONPATH), not installed.
# Without torch or CUDA (and without --device cpu) it prints one line and exits 0; a torch that is installed
# but fails to import exits 1 with its error. Writes OUT_DIR/gpu_check.{json,md}.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
[ $# -ge 1 ] || { echo "usage: bash scripts/gpu_check.sh OUT_DIR [--wheels DIR] [--device cpu] [--tiny] ..."; exit 2; }
out="$1"; shift
wheels=""; device="cuda"; rest=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels="$2"; shift 2 ;;
    --wheels=*) wheels="${1#--wheels=}"; shift ;;
    --device) device="$2"; rest+=("$1" "$2"); shift 2 ;;
    --device=*) device="${1#--device=}"; rest+=("$1"); shift ;;
    *) rest+=("$1"); shift ;;
  esac
done
if ! "$py" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('torch') else 1)"; then
  echo "gpu_check: skipped, $py has no torch (install a CUDA build of torch first)"; exit 0
fi
if ! err="$("$py" -c "import torch" 2>&1)"; then  # installed but broken (e.g. a CUDA build without its libraries)
  echo "gpu_check: FAILED, $py has torch but cannot import it:"; echo "$err" | tail -n 5; exit 1
fi
if [ "$device" = "cuda" ] && ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: skipped, no CUDA device (torch.cuda.is_available() is False)"; exit 0
fi
mkdir -p "$out"
if ! "$py" -c "import nnunetv2, SimpleITK, surface_distance" 2>/dev/null; then
  [ -n "$wheels" ] || { echo "gpu_check: nnU-Net is not installed; pass --wheels DIR (scripts/gpu_wheels.sh)"; exit 2; }
  echo "[gpu_check] installing nnU-Net and dependencies offline from $wheels into $out/venv"
  "$py" -m venv --system-site-packages "$out/venv"
  "$out/venv/bin/python" -m pip install -q --no-index --find-links "$wheels" -r "$wheels/requirements.txt"
  py="$out/venv/bin/python"
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" "$repo/scripts/gpu_check.py" "$out" "${rest[@]}"

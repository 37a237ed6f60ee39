#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install nnunet_proto with its tests.
# Idempotent: re-running only reinstalls when pyproject.toml changed. Prints the venv's python path.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${NNUNET_PROTO_VENV:-$repo/.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.nnunet_proto_installed"
want="$(sha256sum "$repo/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment $venv" >&2
  "$python" -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing torch, nnU-Net and nnunet_proto (a few minutes on first run)" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  # torch first, pinned: a plain 'torch' requirement could pull a different multi-GB build
  "$venv/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" >&2
  "$venv/bin/python" -m pip install -q -e "$repo[test]" >&2
  echo "$want" > "$stamp"
fi
echo "$venv/bin/python"

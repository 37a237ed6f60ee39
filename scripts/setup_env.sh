#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install nnunet_proto with its tests.
# Idempotent: re-running only reinstalls when pyproject.toml changed. Prints the venv's python path.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${NNUNET_PROTO_VENV:-$repo/.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.nnunet_proto_installed"
want="$(sha256sum "$repo/pyproject.toml" | cut -d' ' -f1)"
too_old() { ! "$1" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; }
if [ ! -x "$venv/bin/python" ]; then
  if ! command -v "$python" >/dev/null; then
    echo "error: '$python' not found; nnunet_proto needs Python 3.10 or newer: run with PYTHON=python3.X (3.10+)." >&2
    exit 1
  elif too_old "$python"; then
    echo "error: nnunet_proto needs Python 3.10 or newer; '$python' is $("$python" --version 2>&1)." \
      "Run with PYTHON=python3.X (3.10+)." >&2
    exit 1
  fi
  echo "[setup] creating virtual environment $venv" >&2
  "$python" -m venv "$venv"
elif too_old "$venv/bin/python"; then
  echo "error: $venv was made with $("$venv/bin/python" --version 2>&1); nnunet_proto needs Python 3.10 or newer." \
    "Delete $venv and run again with PYTHON=python3.X (3.10+)." >&2
  exit 1
fi
# one installer at a time: the quickstart and the tests started together would otherwise both install into $venv
exec 9>"$venv/.nnunet_proto_install.lock"
command -v flock >/dev/null && flock 9
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing torch, nnU-Net and nnunet_proto (a few minutes on first run)" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  # torch first, pinned: a plain 'torch' requirement could pull a different multi-GB build
  "$venv/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" >&2
  "$venv/bin/python" -m pip install -q -e "$repo[test]" >&2
  echo "$want" > "$stamp"
fi
echo "$venv/bin/python"

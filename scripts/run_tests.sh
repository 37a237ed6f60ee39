#!/usr/bin/env bash
# Set up .venv if needed, then run the test suite (CPU only; slow tests are deselected unless
# NNUNET_PROTO_SLOW=1). Extra arguments go to pytest. The 30 slowest tests are listed at the end, to keep the
# default run (what .ci/run calls) within its time budget.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$("$repo/scripts/setup_env.sh")"
cd "$repo"
marker=(-m "not slow")
[ "${NNUNET_PROTO_SLOW:-0}" = "1" ] && marker=()
export nnUNet_compile=f OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
"$py" -m ruff check nnunet_proto trainers tests scripts
exec "$py" -m pytest "${marker[@]}" -q --durations=30 "$@"

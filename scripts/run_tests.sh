#!/usr/bin/env bash
# Set up .venv if needed, then run the test suite (CPU only; slow tests are deselected unless
# NNUNET_PROTO_SLOW=1). Extra arguments go to pytest. The tests run in NNUNET_PROTO_TEST_WORKERS (default 2)
# pytest-xdist processes with one OpenMP thread each (1: one process, in order). The 30 slowest tests are listed at
# the end, to keep the default run (what .ci/run calls) within its time budget.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$("$repo/scripts/setup_env.sh")"
cd "$repo"
marker=(-m "not slow")
[ "${NNUNET_PROTO_SLOW:-0}" = "1" ] && marker=()
workers="${NNUNET_PROTO_TEST_WORKERS:-2}"
case "$workers" in
  ''|*[!0-9]*|0) echo "NNUNET_PROTO_TEST_WORKERS must be a whole number >= 1, got '$workers'" >&2; exit 2 ;;
  1) parallel=(); threads=2 ;;
  # worksteal: a worker that runs out of tests takes some of the other's, so one slow file does not idle a core
  *) parallel=(-n "$workers" --dist worksteal); threads=1 ;;
esac
export nnUNet_compile=f OMP_NUM_THREADS="${OMP_NUM_THREADS:-$threads}"
"$py" -m ruff check nnunet_proto trainers tests scripts
exec "$py" -m pytest "${marker[@]}" "${parallel[@]}" -q --durations=30 "$@"

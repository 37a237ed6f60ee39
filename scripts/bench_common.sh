# Sourced by the benchmark scripts after they set `bench` (acdc, la): the project's venv ($py, $np, $cli),
# nnU-Net's folders (yours if exported, else under $NNUNET_PROTO_WORK/$bench, default ./nnunet_proto_work/$bench)
# and the CPU settings (2 threads, 2 augmentation workers, no torch.compile).
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$("$repo/scripts/setup_env.sh")"
work="${NNUNET_PROTO_WORK:-$repo/nnunet_proto_work}/$bench"
export nnUNet_raw="${nnUNet_raw:-$work/raw}" nnUNet_preprocessed="${nnUNet_preprocessed:-$work/preprocessed}"
export nnUNet_results="${nnUNet_results:-$work/results}"
export nnUNet_compile=f OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" nnUNet_n_proc_DA="${nnUNet_n_proc_DA:-2}"
# OpenMP threads sleep instead of spinning while they wait: with anything else on the two cores (augmentation
# workers, another job) spinning threads slowed a CPU prediction 3.8x (77 s vs 20 s for one ACDC frame, measured)
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
np="$(dirname "$py")"
cli=("$py" -m nnunet_proto.cli)
. "$repo/scripts/bench_lib.sh"


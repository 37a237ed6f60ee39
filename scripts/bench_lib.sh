# Resume guards of the benchmark scripts' setup stages (sourced by bench_common.sh; no side effects).

# convert_once DATASET_FOLDER CONVERTER_COMMAND...: run the converter unless DATASET_FOLDER/dataset.json, which
# the converter writes last, exists. Refuses a dataset nnunet_proto did not write (e.g. nnU-Net's own
# Dataset027_ACDC in your nnUNet_raw) and the leftovers of an interrupted conversion, naming the fix.
convert_once() {
  local ds="$1"; shift
  if [ -f "$ds/dataset.json" ]; then
    grep -q '"nnunet_proto"' "$ds/dataset.json" && return 0
    echo "error: $ds was not written by nnunet_proto (its dataset.json has no \"nnunet_proto\" entry; nnU-Net's own" \
      "dataset with this id?). The benchmark converts its own copy: unset nnUNet_raw nnUNet_preprocessed" \
      "nnUNet_results (its data then goes under ${NNUNET_PROTO_WORK:-./nnunet_proto_work}/$bench) or point them at empty folders." >&2
    exit 1
  fi
  if [ -d "$ds" ] && [ -n "$(ls -A "$ds")" ]; then
    echo "error: $ds exists without dataset.json: an interrupted conversion. Delete that folder and run setup again." >&2
    exit 1
  fi
  "$@"
}

# preprocess_once PLANS_DATA_FOLDER DATASET_FOLDER COMMAND...: run nnU-Net's preprocessing unless
# PLANS_DATA_FOLDER holds one .pkl per labelsTr case (nnU-Net writes the plans before the data, so the
# plans file alone does not show that an interrupted preprocessing finished).
preprocess_once() {
  local data="$1" ds="$2" want have; shift 2
  want=$(count_files "$ds/labelsTr" '*.nii.gz')
  have=$(count_files "$data" '*.pkl')
  [ "$want" -gt 0 ] && [ "$have" -eq "$want" ] && return 0
  "$@"
}

# count_files DIR PATTERN: number of files in DIR (not below) matching PATTERN; 0 if DIR does not exist. Safe under
# `set -euo pipefail` (a find on a missing folder would end the calling script there).
count_files() {
  if [ -d "$1" ]; then find "$1" -maxdepth 1 -type f -name "$2" | wc -l; else echo 0; fi
}

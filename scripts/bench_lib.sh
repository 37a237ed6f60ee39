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
  want=$(find "$ds/labelsTr" -maxdepth 1 -type f -name '*.nii.gz' | wc -l)
  have=$(find "$data" -maxdepth 1 -name '*.pkl' 2>/dev/null | wc -l)
  [ "$want" -gt 0 ] && [ "$have" -eq "$want" ] && return 0
  "$@"
}

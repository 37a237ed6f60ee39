#!/usr/bin/env bash
# The main job end to end, on a fresh machine, with nnU-Net's own commands:
#   set up .venv -> make a small synthetic dataset (labeled, unlabeled and test images) -> plan and
#   preprocess -> preprocess the unlabeled images -> a label-scarce fold (4 labeled cases) ->
#   train plain nnU-Net and nnUNetTrainerCPCL on exactly those labeled cases -> predict the test images
#   with nnUNetv2_predict -> evaluate both (Dice, IoU, HD95, ASD).
#
# Usage: bash scripts/quickstart.sh [TRAINER]      (default nnUNetTrainerCPCL; e.g. nnUNetTrainerMeanTeacher)
# Environment: NNUNET_PROTO_WORK (default ./nnunet_proto_work) holds nnUNet_raw/_preprocessed/_results
# unless those variables are already set; DEVICE (default: cuda if available, else cpu);
# SCHEDULE (default demo: 8 epochs x 60 iterations; use e.g. 5epochs or 250epochs for longer runs).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
trainer="${1:-nnUNetTrainerCPCL}"
py="$("$repo/scripts/setup_env.sh")"
bin="$(dirname "$py")"
work="${NNUNET_PROTO_WORK:-$repo/nnunet_proto_work}"
export nnUNet_raw="${nnUNet_raw:-$work/nnUNet_raw}"
export nnUNet_preprocessed="${nnUNet_preprocessed:-$work/nnUNet_preprocessed}"
export nnUNet_results="${nnUNet_results:-$work/nnUNet_results}"
export nnUNet_extTrainer="$repo/trainers" nnUNet_compile="${nnUNet_compile:-f}" nnUNet_def_n_proc="${nnUNet_def_n_proc:-1}"
device="${DEVICE:-$("$py" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}"
schedule="${SCHEDULE:-demo}"
id=950
name="Dataset${id}_Synthetic"
plans=nnUNetPlans_demo
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
step() { echo; echo "=== $* ==="; }

. "$repo/scripts/bench_lib.sh"  # preprocess_once
if [ ! -f "$nnUNet_raw/$name/dataset.json" ]; then
  step "1/7 synthetic dataset: 24 labeled, 40 unlabeled, 10 test images"
  # dataset.json is written last: a folder without it is an interrupted generation of this dataset, made again
  "$bin/nnunet_proto" synthetic -d $id --labeled 24 --unlabeled 40 --test 10 --shape 6 64 64 --seed 0 --overwrite
fi
step "2/7 nnUNetv2_plan_and_preprocess (2d), unless an earlier run finished it"
preprocess_once "$nnUNet_preprocessed/$name/nnUNetPlans_2d" "$nnUNet_raw/$name" \
  "$bin/nnUNetv2_plan_and_preprocess" -d $id -c 2d -np 2 --verify_dataset_integrity
step "3/7 CPU demo plan (plans/synthetic_demo.json) and unlabeled preprocessing"
"$bin/nnunet_proto" plans-patch -d $id "$repo/plans/synthetic_demo.json"
"$bin/nnunet_proto" preprocess-unlabeled -d $id -c 2d -p $plans -np 2
step "4/7 label-scarce fold: 4 labeled cases, the rest of the training cases unlabeled"
fold="$("$bin/nnunet_proto" make-splits -d $id --labeled 4 --seed 0)"

export nnUNet_n_proc_DA="${nnUNet_n_proc_DA:-2}"
for tr in "nnUNetTrainer_$schedule" "${trainer}_$schedule"; do
  step "5/7 nnUNetv2_train $id 2d $fold -tr $tr -p $plans -device $device"
  "$bin/nnUNetv2_train" $id 2d "$fold" -tr "$tr" -p $plans -device "$device"
  step "6/7 nnUNetv2_predict with $tr"
  out="$work/predictions/$tr"
  "$bin/nnUNetv2_predict" -i "$nnUNet_raw/$name/imagesTs" -o "$out" -d $id -c 2d -f "$fold" -tr "$tr" -p $plans \
    -device "$device" -npp 1 -nps 1 --disable_tta
  step "7/7 nnunet_proto evaluate ($tr)"
  # --overwrite: a re-run of this script trained and predicted again, so its evaluation replaces the last one
  "$bin/nnunet_proto" evaluate "$nnUNet_raw/$name/labelsTs" "$out" -o "$work/evaluation_$tr.json" --overwrite
done
step "summary: foreground means over the 10 test images (one run each; a demo, not a benchmark)"
"$py" - "$work" "nnUNetTrainer_$schedule" "${trainer}_$schedule" <<'PY'
import json, sys
work = sys.argv[1]
for tr in sys.argv[2:]:
    m = json.load(open(f"{work}/evaluation_{tr}.json"))["foreground_mean"]
    print(f"{tr:40s} Dice {m['Dice']:.3f}  IoU {m['IoU']:.3f}  HD95 {m['HD95']:.2f} mm  ASD {m['ASD']:.2f} mm")
PY
echo
echo "Done. Models: $nnUNet_results/$name; predictions: $work/predictions; metrics: $work/evaluation_*.json"
echo "The EMA teacher of $trainer is in checkpoint_final_teacher.pth (nnUNetv2_predict ... -chk checkpoint_final_teacher.pth)."

#!/usr/bin/env bash
# The left-atrium 3D CPU benchmark: plain nnU-Net against a semi-supervised trainer on the 3D path.
# Every stage resumes where it stopped when run again (finished runs are skipped).
#
#   bash scripts/la_benchmark.sh setup LA_H5_DIR            # convert, plan at 1.25 mm, preprocess, CPU plan
#   bash scripts/la_benchmark.sh run TRAINER [TRAINER ...]  # plain + these, labeled 4, seed 0, 1000 steps
#
# LA_H5_DIR: UA-MT left-atrium h5 files named <ID>.h5 (image + label); 5 cases are held out as the test
# set (--seed 0), the rest train (nnU-Net's fold-0 validation cases are reused, 4 labeled cases, the
# others unlabeled). Folders: $NNUNET_PROTO_WORK/la (default ./nnunet_proto_work/la) holds raw/, preprocessed/
# and results/ for nnU-Net unless nnUNet_raw, nnUNet_preprocessed and nnUNet_results are set; the report
# goes to $NNUNET_PROTO_WORK/la/reports/la_3d. Test cases are predicted without
# mirroring (--disable-tta, as in the ACDC benchmark). CPU settings: 2 threads,
# 2 augmentation workers, no torch.compile, fp32 for every trainer. Extra arguments after the trainers
# go to `nnunet_proto benchmark` (e.g. --precision bf16, --no-control).
set -euo pipefail
case "${1:-}" in
  setup|run) ;;
  *) sed -n '2,15p' "$0" >&2; exit 2 ;;
esac
bench=la
. "$(dirname "${BASH_SOURCE[0]}")/bench_common.sh"
stage="$1"
shift
case "$stage" in
  setup)
    [ $# -eq 1 ] || { echo "usage: $0 setup LA_H5_DIR" >&2; exit 2; }
    convert_once "$nnUNet_raw/Dataset028_LA" "${cli[@]}" convert-la "$1" -d 28 --test-count 5 --seed 0
    # 0.625 mm voxels make a 3D CPU step take over a minute; nnU-Net's planner at 1.25 mm (plans/README.md)
    preprocess_once "$nnUNet_preprocessed/Dataset028_LA/nnUNetPlans_1.25mm_3d_fullres" "$nnUNet_raw/Dataset028_LA" \
      "$np/nnUNetv2_plan_and_preprocess" -d 28 -c 3d_fullres -np 2 \
      -overwrite_target_spacing 1.25 1.25 1.25 -overwrite_plans_name nnUNetPlans_1.25mm
    "${cli[@]}" plans-patch -d 28 "$repo/plans/la_3d_cpu.json" --source-plans nnUNetPlans_1.25mm
    ;;
  run)
    [ $# -ge 1 ] || { echo "usage: $0 run TRAINER [TRAINER ...] (the best 2D trainer on validation)" >&2; exit 2; }
    trainers=()
    while [ $# -gt 0 ] && [[ "$1" != -* ]]; do trainers+=("$1"); shift; done
    [ ${#trainers[@]} -ge 1 ] || { echo "usage: $0 run TRAINER [TRAINER ...] [benchmark options]: name the trainers first" >&2; exit 2; }
    # 20 epochs x 50 iterations = 1000 steps per run
    "${cli[@]}" benchmark -d 28 -c 3d_fullres -p nnUNetPlans_1.25mm_cpu --labeled 4 --seeds 0 --epochs 20 \
      --iterations 50 --disable-tta --name la_3d -o "$work/reports/la_3d" -tr "${trainers[@]}" "$@"
    ;;
esac

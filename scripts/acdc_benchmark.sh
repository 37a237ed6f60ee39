#!/usr/bin/env bash
# The ACDC CPU benchmark of issue "make the semi-supervised trainers beat plain nnU-Net", stage by stage.
# Every stage resumes where it stopped when run again (finished runs are skipped).
#
#   bash scripts/acdc_benchmark.sh setup   LABELED_H5_DIR UNLABELED_H5_DIR   # convert, plan, preprocess
#   bash scripts/acdc_benchmark.sh screen                                    # all trainers, labeled 4, seed 0
#   bash scripts/acdc_benchmark.sh ablate [TRAINER ...]                      # + each method's _paper variant (and these
#                                                                            # ablations, e.g. nnUNetTrainerMSPA_SPA), same runs
#   bash scripts/acdc_benchmark.sh best [K]                                  # the K (3) best methods of the screening on
#                                                                            # validation (a method's default or a variant)
#   bash scripts/acdc_benchmark.sh bf16                                      # plain + CPCL under CPU bf16, screening budget
#   bash scripts/acdc_benchmark.sh confirm TRAINER [TRAINER ...]             # plain + these, labeled 2 and 4, seeds 0 1 2,
#                                                                            # CPU bf16 for all (see NNUNET_PROTO_PRECISION),
#                                                                            # with the A/A control, offline self-training and plain
#                                                                            # at equal compute (reused from the selftrain stage)
#   bash scripts/acdc_benchmark.sh selftrain-screen                          # self-training students on validation (labeled 4,
#                                                                            # seed 0): defaults vs share, drop, noisy, warm start
#   bash scripts/acdc_benchmark.sh selftrain                                 # plain, offline self-training, plain at equal compute:
#                                                                            # labeled 2 and 4, seeds 0 1 2, the confirmation's budget
#   bash scripts/acdc_benchmark.sh redesign-screen [TRAINER ...]             # issue 23's redesign on validation (labeled 4, seed 0,
#                                                                            # the confirmation's budget): CPCL, its one-switch
#                                                                            # variants, _v2 and _labeledcontrol, MT/PCCS _v2,
#                                                                            # BCP/MPER _warm, UniMatch, its _wband and
#                                                                            # _quantile (+ these)
#   bash scripts/acdc_benchmark.sh redesign-best [K]                         # the K (3) best of that screening by the rule of
#                                                                            # docs/methods/README.md (one per method, no control)
#   bash scripts/acdc_benchmark.sh redesign-confirm                          # confirm those three (the confirm stage), plain at
#                                                                            # equal compute = the largest total time vs plain of
#                                                                            # the three in the screening (unless set, below)
#   bash scripts/acdc_benchmark.sh export BENCHMARK FILE                     # the finished runs' records of benchmark BENCHMARK
#                                                                            # (e.g. acdc_redesign_screen_fp32) into FILE
#   bash scripts/acdc_benchmark.sh import BENCHMARK FILE                     # add them to BENCHMARK on this machine (after setup),
#                                                                            # report in reports/BENCHMARK; the stage then resumes
#                                                                            # with the other runs
#
# LABELED_H5_DIR: SSL4MIS ACDC h5 files with labels (patientXXX_frameYY.h5); UNLABELED_H5_DIR: more
# patients' h5 images (labels, if any, are ignored). Folders: $NNUNET_PROTO_WORK/acdc (default
# ./nnunet_proto_work/acdc) holds raw/, preprocessed/ and results/ for nnU-Net unless nnUNet_raw,
# nnUNet_preprocessed and nnUNet_results are set; reports go to $NNUNET_PROTO_WORK/acdc/reports/<stage>. CPU settings: 2 threads,
# 2 augmentation workers, no torch.compile; one precision for every trainer, plain included: fp32 for the
# screening, bf16 for the confirmation (parity measured by stage bf16: docs/benchmarks/gpu_readiness_cpu.md).
# NNUNET_PROTO_PRECISION=fp32 runs the bf16 stages (selftrain*, redesign-*, confirm) in fp32 instead, for a CPU
# without bfloat16 kernels (AVX2 only: bf16 there is ~10x slower than fp32, and the benchmark refuses it); the
# benchmarks then get their own names (acdc_selftrain_fp32, acdc_redesign_screen_fp32), never mixed with bf16 runs.
# Choices are made on the fold's nnU-Net validation cases only ("best" reads validation_ranking of the
# screening's summary.json), never on the test frames.
set -euo pipefail
case "${1:-}" in
  setup|screen|ablate|best|bf16|confirm|selftrain-screen|selftrain|redesign-screen|redesign-best|redesign-confirm) ;;
  export|import)
    [ $# -eq 3 ] || { echo "usage: $0 $1 BENCHMARK FILE (e.g. $1 acdc_redesign_screen_fp32 runs.json.gz)" >&2; exit 2; } ;;
  *) awk 'NR > 1 && /^set -euo/ {exit} NR > 1' "$0" >&2; exit 2 ;;
esac
# the precision of the stages that run under CPU bf16 by default (NNUNET_PROTO_CONFIRM_PRECISION: its older name)
precision="${NNUNET_PROTO_PRECISION:-${NNUNET_PROTO_CONFIRM_PRECISION:-bf16}}"
case "$precision" in
  bf16) sfx="" ;;  # the names the bf16 benchmarks always had
  fp32) sfx=_fp32 ;;
  *) echo "NNUNET_PROTO_PRECISION must be bf16 or fp32, got '$precision'" >&2; exit 2 ;;
esac
redesign="acdc_redesign_screen$sfx"
bench=acdc
. "$(dirname "${BASH_SOURCE[0]}")/bench_common.sh"
# one budget per stage (steps = epochs x 100 iterations); the CPU plan of plans/acdc_2d_cpu.json
common=(-d 27 -c 2d -p nnUNetPlans_cpu --iterations 100 --group-regex '(patient\d+)' --disable-tta)
screen=(nnUNetTrainerMeanTeacher nnUNetTrainerCPCL nnUNetTrainerMSPA nnUNetTrainerMPER nnUNetTrainerPCCS nnUNetTrainerBCP)
# plain nnU-Net at equal compute: steps x the s/step ratio of the most expensive trainer of the confirmation (PCCS,
# 2.32x plain under CPU bf16 in the side-by-side timing), rounded; override both together. redesign-confirm derives
# both from its screening instead unless NNUNET_PROTO_EQUAL_COMPUTE is set (ablation.equal_compute_factor)
equal_compute="${NNUNET_PROTO_EQUAL_COMPUTE:-2.3}"
equal_source="${NNUNET_PROTO_EQUAL_COMPUTE_SOURCE:-nnUNetTrainerPCCS, 2.32x plain per step under CPU bf16 (docs/benchmarks/timing_acdc_2d_cpu.md), rounded to 2.3}"
# offline self-training's screening: the default student and one change each, on validation only (it ran when the
# default trained from scratch; _fromteacher won and is the default since, _scratch the old form)
students=(nnUNetTrainerSelfTraining nnUNetTrainerSelfTraining_share25 nnUNetTrainerSelfTraining_share75
          nnUNetTrainerSelfTraining_drop25 nnUNetTrainerSelfTraining_noisy nnUNetTrainerSelfTraining_fromteacher)
# issue 23's redesign (nnunet_proto/training/variants.py REDESIGN): CPCL (the one confirmed gain) switch by switch,
# every teacher-student method with all switches (_v2), BCP and MPER warm-started from the plain run of the fold
# (item 6), CPCL's control with labeled patches in place of the unlabeled ones (item 7), and the weak-to-strong
# baseline
redesigned=(nnUNetTrainerCPCL nnUNetTrainerCPCL_v2 nnUNetTrainerCPCL_strong nnUNetTrainerCPCL_ema99
          nnUNetTrainerCPCL_quantile nnUNetTrainerCPCL_wband nnUNetTrainerCPCL_ramp20 nnUNetTrainerCPCL_labeledcontrol
          nnUNetTrainerMeanTeacher_v2 nnUNetTrainerPCCS_v2 nnUNetTrainerBCP_warm nnUNetTrainerMPER_warm
          nnUNetTrainerUniMatch nnUNetTrainerUniMatch_wband nnUNetTrainerUniMatch_quantile nnUNetTrainerBCP_warm_lcc
          nnUNetTrainerBCP_warm_labeledcontrol)
# the decision rule's step 1 (docs/methods/README.md, nnunet_proto.benchmark.ablation.confirmation_picks): the K best
# rows of a screening by nnU-Net's validation Dice, one per method, controls left out; prints their names
pick_best() {
  "${cli[@]}" benchmark --report-only --name "$1" -o "$work/reports/$1" >/dev/null
  "$py" - "$work/reports/$1/summary.json" "$2" <<'PY'
import json, sys
from nnunet_proto.benchmark.ablation import confirmation_picks
ranking = json.load(open(sys.argv[1]))["validation_ranking"]["4"]
for r in ranking:
    print(f"{r['trainer']}: validation Dice {100 * r['validation_dice']:.1f}", file=sys.stderr)
print(" ".join(confirmation_picks(ranking, int(sys.argv[2]))))
PY
}
# plain at equal compute for a confirmation of the given trainers of screening $1: "FACTOR<tab>SOURCE"
screen_equal_compute() {
  local bench="$1"
  shift
  "$py" - "$work/reports/$bench/summary.json" "$@" <<'PY'
import json, sys
from nnunet_proto.benchmark.ablation import equal_compute_factor
try:
    factor, source = equal_compute_factor(json.load(open(sys.argv[1])), sys.argv[2:])
except ValueError as e:
    sys.exit(f"[acdc_benchmark] plain at equal compute: {e}")
print(f"{factor}\t{source}")
PY
}
stage="${1:-}"
shift || true
case "$stage" in
  setup)
    [ $# -eq 2 ] || { echo "usage: $0 setup LABELED_H5_DIR UNLABELED_H5_DIR" >&2; exit 2; }
    ds="$nnUNet_raw/Dataset027_ACDC"
    convert_once "$ds" "${cli[@]}" convert-acdc "$1" -d 27 --test-count 10 --seed 0
    # each image is written whole (temporary file, then renamed): a partial pool is completed (--overwrite only
    # lets the converter rewrite the images already there, it deletes nothing)
    if [ "$(count_files "$ds/imagesUnlabeled" '*_0000.nii.gz')" -ne "$(count_files "$2" '*.h5')" ]; then
      "${cli[@]}" convert-acdc "$2" -d 27 --unlabeled --overwrite
    fi
    preprocess_once "$nnUNet_preprocessed/Dataset027_ACDC/nnUNetPlans_2d" "$ds" \
      "$np/nnUNetv2_plan_and_preprocess" -d 27 -c 2d -np 2
    "${cli[@]}" plans-patch -d 27 "$repo/plans/acdc_2d_cpu.json"
    "${cli[@]}" preprocess-unlabeled -d 27 -c 2d -p nnUNetPlans_cpu
    ;;
  screen)
    "${cli[@]}" benchmark "${common[@]}" --labeled 4 --seeds 0 --epochs 15 --name acdc_screen \
      -o "$work/reports/acdc_screen" -tr "${screen[@]}" "$@"
    ;;
  ablate)
    "${cli[@]}" benchmark "${common[@]}" --labeled 4 --seeds 0 --epochs 15 --name acdc_screen \
      -o "$work/reports/acdc_screen" -tr "${screen[@]}" "${screen[@]/%/_paper}" "$@"
    ;;
  best)
    pick_best acdc_screen "${1:-3}"
    ;;
  redesign-best)
    pick_best "$redesign" "${1:-3}"
    ;;
  bf16)
    "${cli[@]}" benchmark "${common[@]}" --labeled 4 --seeds 0 --epochs 15 --name acdc_bf16 --precision bf16 \
      --no-control -o "$work/reports/acdc_bf16" -tr nnUNetTrainerCPCL "$@"
    ;;
  confirm)
    [ $# -ge 1 ] || { echo "usage: $0 confirm TRAINER [TRAINER ...] (the best three of the screening)" >&2; exit 2; }
    # the trainers join the benchmark of the selftrain stage (same folds, seeds, budget and precision): its plain,
    # self-training and equal-compute runs are reused, not trained again; the A/A control is added
    "${cli[@]}" benchmark "${common[@]}" --labeled 2 4 --seeds 0 1 2 --epochs 30 --precision "$precision" \
      --self-training --equal-compute "$equal_compute" --equal-compute-source "$equal_source" \
      --name "acdc_selftrain_$precision" -o "$work/reports/acdc_redesign_confirm_$precision" -tr "$@"
    ;;
  redesign-confirm)
    # issue 23's confirmation: the best three of the redesign screening by the pre-registered rule
    read -r -a best <<< "$(pick_best "$redesign" 3)"
    [ ${#best[@]} -ge 1 ] || { echo "the redesign screening has no finished run: run redesign-screen first" >&2; exit 1; }
    echo "[acdc_benchmark] confirming ${best[*]}" >&2
    if [ -z "${NNUNET_PROTO_EQUAL_COMPUTE:-}" ]; then  # pick_best has just written the screening's summary.json
      eq="$(screen_equal_compute "$redesign" "${best[@]}")"
      export NNUNET_PROTO_EQUAL_COMPUTE="${eq%%$'\t'*}" NNUNET_PROTO_EQUAL_COMPUTE_SOURCE="${eq#*$'\t'}"
      echo "[acdc_benchmark] plain at equal compute: x$NNUNET_PROTO_EQUAL_COMPUTE ($NNUNET_PROTO_EQUAL_COMPUTE_SOURCE)" >&2
    fi
    bash "$0" confirm "${best[@]}" "$@"
    ;;
  selftrain-screen)
    # the screening runs sit in the self-training benchmark (they share its plain teacher of labeled 4, seed 0);
    # its report here is written before `selftrain` drops them from the confirmation's report (--forget)
    "${cli[@]}" benchmark "${common[@]}" --labeled 4 --seeds 0 --epochs 30 --precision "$precision" --no-control \
      --name "acdc_selftrain_$precision" -o "$work/reports/acdc_selftrain_screen$sfx" -tr "${students[@]}" "$@"
    ;;
  selftrain)
    results="$nnUNet_results/nnunet_proto_benchmarks/acdc_selftrain_$precision"
    if grep -q '_share25' "$results/runs.json" 2>/dev/null; then  # the screening's variants: their own report
      "${cli[@]}" benchmark --report-only --name "acdc_selftrain_$precision" \
        -o "$work/reports/acdc_selftrain_screen$sfx" >/dev/null
      "${cli[@]}" benchmark --name "acdc_selftrain_$precision" --forget "${students[@]:1}"
    fi
    "${cli[@]}" benchmark "${common[@]}" --labeled 2 4 --seeds 0 1 2 --epochs 30 --precision "$precision" --no-control \
      --self-training --equal-compute "$equal_compute" --equal-compute-source "$equal_source" \
      --name "acdc_selftrain_$precision" -o "$work/reports/acdc_selftrain_$precision" -tr nnUNetTrainer "$@"
    ;;
  export|import)
    # records of finished runs between machines (nnunet_proto benchmark --export-runs/--import-runs)
    "${cli[@]}" benchmark --name "$1" --"$stage"-runs "$2" -o "$work/reports/$1"
    ;;
  redesign-screen)
    "${cli[@]}" benchmark "${common[@]}" --labeled 4 --seeds 0 --epochs 30 --precision "$precision" --no-control \
      --name "$redesign" -o "$work/reports/$redesign" -tr "${redesigned[@]}" "$@"
    ;;
  *)
    awk 'NR > 1 && /^set -euo/ {exit} NR > 1' "$0" >&2
    exit 2
    ;;
esac

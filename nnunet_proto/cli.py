"""``nnunet_proto`` command line: data tools around nnU-Net's own commands.

    nnunet_proto synthetic -d 901 --mode 2d --labeled 24 --unlabeled 40 --test 10
    nnunet_proto preprocess-unlabeled -d 901 -c 2d 3d_fullres
    nnunet_proto make-splits -d 901 --labeled 10% --seed 0 [--group-regex 'patient(\\d+)']
    nnunet_proto plans-patch -d 901 plans/synthetic_tiny.json
    nnunet_proto trainers-path
    nnunet_proto convert-acdc /data/acdc30_h5 -d 27 --test-count 10 --seed 0 [-o RAW_ROOT]
    nnunet_proto convert-la /data/la20_h5 -d 28 [--test-list ID ...]
    nnunet_proto evaluate labelsTs predictions -o results.json [-l 1 2 3]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

REPO_TRAINERS = Path(__file__).resolve().parent.parent / "trainers"


def trainers_path() -> Path:
    """The folder to put into ``nnUNet_extTrainer`` (the repository's ``trainers/``)."""
    if not (REPO_TRAINERS / "nnUNetTrainerCPCL.py").is_file():
        raise FileNotFoundError(f"{REPO_TRAINERS} not found: nnunet_proto must be installed from a checkout of the "
                                f"repository (pip install -e .) so that the trainers/ folder exists")
    return REPO_TRAINERS


def _dataset_name(dataset: str) -> str:
    from nnunet_proto.training.compat import maybe_convert_to_dataset_name

    return maybe_convert_to_dataset_name(dataset)


def cmd_synthetic(args) -> int:
    from nnunet_proto.data.synthetic import SyntheticSpec, write_synthetic_dataset
    from nnunet_proto.training.compat import nnUNet_raw, require_env_path

    spec = SyntheticSpec(dataset_id=args.dataset_id, name=args.name, mode=args.mode, num_labeled=args.labeled,
                         num_unlabeled=args.unlabeled, num_test=args.test,
                         shape=tuple(args.shape) if args.shape else None, seed=args.seed,
                         ignore_fraction=args.ignore_fraction)
    out = write_synthetic_dataset(spec, args.output or require_env_path(nnUNet_raw), overwrite=args.overwrite)
    print(f"wrote {out} ({spec.num_labeled} labeled, {spec.num_unlabeled} unlabeled, {spec.num_test} test cases)")
    return 0


def cmd_preprocess_unlabeled(args) -> int:
    from nnunet_proto.data.unlabeled_preprocessing import preprocess_unlabeled

    summary = preprocess_unlabeled(args.dataset, args.configurations, args.plans, args.num_processes, args.overwrite)
    for cfg, s in summary.items():
        print(f"{cfg}: {s['num_cases']} unlabeled cases ({s['new']} new) in {s['folder']}")
    return 0


def cmd_make_splits(args) -> int:
    from nnunet_proto.data.splits import LabeledAmount, make_label_scarce_fold
    from nnunet_proto.training.compat import load_json, nnUNet_preprocessed, nnUNet_raw, require_env_path

    name = _dataset_name(args.dataset)
    pre = os.path.join(require_env_path(nnUNet_preprocessed), name)
    raw = os.path.join(nnUNet_raw.get(), name) if nnUNet_raw.is_set() else None
    ending = load_json(os.path.join(pre, "dataset.json"))["file_ending"]
    fold, content = make_label_scarce_fold(pre, LabeledAmount.parse(args.labeled), args.seed, args.group_regex,
                                           args.base_fold, raw, ending)
    print(f"fold {fold}: {len(content['train'])} labeled, {len(content['val'])} validation, "
          f"{len(content['unlabeled'])} unlabeled cases", file=sys.stderr)
    print(fold)
    return 0


def cmd_plans_patch(args) -> int:
    from nnunet_proto.data.plans_patch import apply_patch_file
    from nnunet_proto.training.compat import nnUNet_preprocessed, require_env_path

    pre = os.path.join(require_env_path(nnUNet_preprocessed), _dataset_name(args.dataset))
    out = apply_patch_file(pre, args.patch, args.source_plans)
    print(f"wrote {out}; train with -p {out.stem}")
    return 0


def cmd_convert_h5(args) -> int:
    import json

    from nnunet_proto.data.convert_h5 import FORMATS, convert_h5_dataset

    if args.output:
        raw_root = args.output
    else:  # only now pay for importing nnU-Net (and torch) to read $nnUNet_raw its way
        from nnunet_proto.training.compat import nnUNet_raw, require_env_path

        raw_root = require_env_path(nnUNet_raw)
    fmt = FORMATS[args.format]
    out = convert_h5_dataset(fmt, Path(args.input_dir), Path(raw_root), args.dataset_id,
                             args.name or fmt.key.upper(), args.spacing, args.test_count, args.test_list,
                             args.seed, args.overwrite)
    info = json.loads((out / "dataset.json").read_text())
    test = info["nnunet_proto"]["test"]
    print(f"wrote {out} ({info['numTraining']} training cases, {len(test['cases'])} test cases from "
          f"{test['count']} {test['unit']}s; spacing (z, y, x) {info['nnunet_proto']['spacing_zyx_mm']} mm)")
    return 0


def cmd_evaluate(args) -> int:
    from nnunet_proto.evaluation.metrics import evaluate_folders, format_mean_table, write_results

    results = evaluate_folders(args.reference, args.prediction, args.labels, num_processes=args.num_processes)
    json_path, csv_path = write_results(results, args.output)
    print(format_mean_table(results))
    print(f"wrote {json_path} and {csv_path}", file=sys.stderr)
    return 0


def cmd_benchmark(args) -> int:
    import shlex
    from pathlib import Path

    from nnunet_proto.benchmark.runner import run_benchmark
    from nnunet_proto.benchmark.spec import BenchmarkSpec
    from nnunet_proto.training.compat import nnUNet_raw, nnUNet_results, require_env_path

    name = _dataset_name(args.dataset)
    raw = Path(nnUNet_raw.get()) / name if nnUNet_raw.is_set() else None
    test_images = args.test_images or (str(raw / "imagesTs") if raw else None)
    test_labels = args.test_labels or (str(raw / "labelsTs") if raw else None)
    if not test_images or not test_labels:
        raise ValueError("give --test-images and --test-labels (or set nnUNet_raw so that imagesTs/labelsTs are used)")
    spec = BenchmarkSpec(
        dataset=args.dataset, configuration=args.configuration, plans=args.plans, trainers=tuple(args.trainers),
        amounts=tuple(args.labeled), seeds=tuple(args.seeds), test_images=test_images, test_labels=test_labels,
        epochs=args.epochs, iterations_per_epoch=args.iterations, val_iterations_per_epoch=args.val_iterations,
        group_regex=args.group_regex, base_fold=args.base_fold, device=args.device, checkpoint=args.checkpoint,
        run_validation=not args.no_validation, precision=args.precision,
        test_time_mirroring=not args.disable_tta, labels=tuple(args.labels) if args.labels else None, name=args.name,
        notes=args.notes or "", extra={"command": "nnunet_proto " + shlex.join(sys.argv[1:])})
    results = Path(args.results_dir) if args.results_dir else \
        Path(require_env_path(nnUNet_results)) / "nnunet_proto_benchmarks" / args.name
    report_dir = Path(args.output) if args.output else results / "report"
    if args.report_only:
        from nnunet_proto.benchmark.report import write_report

        print(write_report(spec, results, report_dir))
        return 0
    run_benchmark(spec, results, report_dir)
    return 0


def cmd_trainers_path(args) -> int:
    print(trainers_path())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnunet_proto", description="Semi-supervised nnU-Net v2 tools")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synthetic", help="write a synthetic multi-class dataset in nnU-Net raw format")
    s.add_argument("-d", "--dataset-id", type=int, required=True)
    s.add_argument("--name", default="Synthetic")
    s.add_argument("--mode", choices=["2d", "3d"], default="2d",
                   help="2d: thick-slice stacks (train the 2d configuration); 3d: near-isotropic volumes")
    s.add_argument("--labeled", type=int, default=24, help="cases in imagesTr/labelsTr")
    s.add_argument("--unlabeled", type=int, default=0, help="cases in imagesUnlabeled")
    s.add_argument("--test", type=int, default=0, help="cases in imagesTs/labelsTs")
    s.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--ignore-fraction", type=float, default=0.0,
                   help="simulate sparse annotation: a box covering this fraction of each slice of the labeled "
                        "cases gets nnU-Net's ignore label")
    s.add_argument("-o", "--output", help="raw root folder (default: $nnUNet_raw)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_synthetic)

    s = sub.add_parser("preprocess-unlabeled", help="preprocess nnUNet_raw/DatasetXXX/imagesUnlabeled")
    s.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    s.add_argument("-c", "--configurations", nargs="+", default=["2d", "3d_fullres"])
    s.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier")
    s.add_argument("-np", "--num-processes", type=int, default=1)
    s.add_argument("--overwrite", action="store_true", help="re-create the preprocessed unlabeled folder")
    s.set_defaults(func=cmd_preprocess_unlabeled)

    s = sub.add_parser("make-splits", help="append a label-scarce fold to splits_final.json and print its number")
    s.add_argument("-d", "--dataset", required=True)
    s.add_argument("--labeled", required=True, help="count (8) or percentage (10%%) of the base fold's training "
                                                      "cases (of groups with --group-regex)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--group-regex", help="cases whose first capture group matches stay together, e.g. "
                                         "'(patient\\d+)' keeps both ACDC frames of a patient on one side")
    s.add_argument("--base-fold", type=int, default=0, help="nnU-Net fold whose val cases are reused (default 0)")
    s.set_defaults(func=cmd_make_splits)

    s = sub.add_parser("plans-patch", help="derive a plans file from nnUNetPlans with a patch from plans/")
    s.add_argument("-d", "--dataset", required=True)
    s.add_argument("patch", help="patch JSON file, e.g. plans/acdc_2d_cpu.json")
    s.add_argument("--source-plans", default="nnUNetPlans")
    s.set_defaults(func=cmd_plans_patch)

    s = sub.add_parser("benchmark", help="train every trainer and plain nnU-Net on the same label-scarce folds, "
                                         "predict and evaluate a test set, write a report (resumable)")
    s.add_argument("-d", "--dataset", required=True)
    s.add_argument("-c", "--configuration", default="2d")
    s.add_argument("-p", "--plans", default="nnUNetPlans")
    s.add_argument("-tr", "--trainers", nargs="+", default=["nnUNetTrainerMeanTeacher", "nnUNetTrainerCPCL"],
                   help="semi-supervised trainers; plain nnUNetTrainer is always added")
    s.add_argument("--labeled", nargs="+", required=True, help="labeled amounts, counts or percentages (2 4 / 10%%)")
    s.add_argument("--seeds", type=int, nargs="+", default=[0], help="each seed picks the labeled cases and seeds "
                                                                      "training")
    s.add_argument("--epochs", type=int, required=True)
    s.add_argument("--iterations", type=int, default=250, help="iterations per epoch")
    s.add_argument("--val-iterations", type=int, default=10, help="nnU-Net's validation iterations per epoch")
    s.add_argument("--group-regex")
    s.add_argument("--base-fold", type=int, default=0)
    s.add_argument("--test-images", help="default: nnUNet_raw/<dataset>/imagesTs")
    s.add_argument("--test-labels", help="default: nnUNet_raw/<dataset>/labelsTs")
    s.add_argument("-l", "--labels", type=int, nargs="+", help="labels to evaluate (default: all foreground)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--checkpoint", choices=["final", "best"], default="final",
                   help="final, or nnU-Net's best on the fold's validation cases (never the test set)")
    s.add_argument("--no-validation", action="store_true", help="skip nnU-Net's final validation of each run")
    s.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="CPU training precision of every run, plain included: bf16 = bfloat16 autocast (opt-in; "
                        "NNUNET_PROTO_CPU_PRECISION, nnUNetTrainer_cpubf16)")
    s.add_argument("--disable-tta", action="store_true",
                   help="predict the test cases without mirroring (nnUNetv2_predict --disable_tta): 8x fewer "
                        "network passes in 3D; the same for every trainer")
    s.add_argument("--name", default="benchmark", help="benchmark name (results sub-folder)")
    s.add_argument("--results-dir", help="default: $nnUNet_results/nnunet_proto_benchmarks/<name>")
    s.add_argument("-o", "--output", help="report folder (default: <results-dir>/report)")
    s.add_argument("--notes", help="free text for the report (what was run and why)")
    s.add_argument("--report-only", action="store_true", help="only rewrite the report from finished runs")
    s.set_defaults(func=cmd_benchmark)

    s = sub.add_parser("trainers-path", help="print the folder to export as nnUNet_extTrainer")
    s.set_defaults(func=cmd_trainers_path)

    for fmt, unit, example in [("acdc", "patient", "patient001"), ("la", "case", "06SR5RBREL16DQ6M8LWS")]:
        s = sub.add_parser(f"convert-{fmt}", help=f"convert the {fmt.upper()} h5 release into an nnU-Net raw dataset")
        s.add_argument("input_dir", help="folder with the .h5 files")
        s.add_argument("-d", "--dataset-id", type=int, required=True)
        s.add_argument("--name", help=f"dataset name (default {fmt.upper()})")
        s.add_argument("--spacing", type=float, nargs=3, metavar=("Z", "Y", "X"),
                       help="voxel spacing in mm (the h5 files store none; default "
                            + ("10 1.5 1.5" if fmt == "acdc" else "0.625 0.625 0.625") + ")")
        g = s.add_mutually_exclusive_group()
        g.add_argument("--test-count", type=int, default=0, help=f"{unit}s drawn at random into imagesTs/labelsTs")
        g.add_argument("--test-list", nargs="+", metavar=unit.upper(), help=f"{unit}s for imagesTs, e.g. {example}")
        s.add_argument("--seed", type=int, default=0, help="seed of the --test-count draw")
        s.add_argument("-o", "--output", help="raw root folder (default: $nnUNet_raw)")
        s.add_argument("--overwrite", action="store_true",
                       help="replace imagesTr/labelsTr/imagesTs/labelsTs/dataset.json of an existing dataset")
        s.set_defaults(func=cmd_convert_h5, format=fmt)

    s = sub.add_parser("evaluate", help="Dice, IoU, HD95 and ASD (mm) of a prediction folder against references")
    s.add_argument("reference", help="folder of reference segmentations (e.g. labelsTs)")
    s.add_argument("prediction", help="folder of predictions with the same file names (e.g. nnUNetv2_predict -o)")
    s.add_argument("-o", "--output", required=True, help="result JSON; a CSV with the same stem is written beside it")
    s.add_argument("-l", "--labels", type=int, nargs="+",
                   help="labels to evaluate (default: all foreground labels of dataset.json in either folder)")
    s.add_argument("-np", "--num-processes", type=int, default=1)
    s.set_defaults(func=cmd_evaluate)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, RuntimeError) as e:
        print(f"nnunet_proto {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""``nnunet_proto`` command line: data tools around nnU-Net's own commands.

    nnunet_proto synthetic -d 901 --mode 2d --labeled 24 --unlabeled 40 --test 10
    nnunet_proto preprocess-unlabeled -d 901 -c 2d 3d_fullres
    nnunet_proto make-splits -d 901 --labeled 10% --seed 0 [--group-regex 'patient(\\d+)']
    nnunet_proto plans-patch -d 901 plans/synthetic_tiny.json [--overwrite]
    nnunet_proto trainers-path
    nnunet_proto convert-acdc /data/acdc30_h5 -d 27 --test-count 10 --seed 0 [-o RAW_ROOT]
    nnunet_proto convert-la /data/la20_h5 -d 28 [--test-list ID ...]
    nnunet_proto evaluate labelsTs predictions [-o results.json | -o folder/] [-l 1 2 3] [--overwrite]
    nnunet_proto pseudo-label -d 27 -c 2d -f 0 -tr nnUNetTrainer [--drop-least-confident 0.25] [--disable_tta]
    nnunet_proto self-train -d 27 -c 2d -f 0 -tr nnUNetTrainer --rounds 2
    nnunet_proto benchmark -d 27 -c 2d -tr nnUNetTrainerCPCL --labeled 2 4 --epochs 20 --name acdc \
        [--self-training] [--equal-compute 2.3 --equal-compute-source TEXT]
    nnunet_proto --version

Every subcommand's --help shows its defaults and an example. Diagnostics go to stderr; stdout carries
only results (make-splits: only the fold number). A bad input ends in one line
``nnunet_proto COMMAND: error: ...`` naming the file or flag (every OSError with its path), exit code 2;
Ctrl-C ends in one line saying what was kept and the command that resumes, exit code 130.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

from nnunet_proto.paths import trainers_path  # noqa: F401  (re-exported: nnunet_proto.cli.trainers_path)


def _dataset_name(dataset: str) -> str:
    from nnunet_proto.training.compat import maybe_convert_to_dataset_name

    return maybe_convert_to_dataset_name(dataset)


def _raw_root(args) -> str:
    """The raw root folder of ``synthetic``/``convert-*``: -o, else $nnUNet_raw; a file there is refused."""
    if args.output:
        raw_root = args.output
        where = "-o"
    else:  # only now pay for importing nnU-Net (and torch) to read $nnUNet_raw its way
        from nnunet_proto.training.compat import nnUNet_raw, require_env_path

        raw_root, where = require_env_path(nnUNet_raw), "nnUNet_raw"
    if os.path.exists(raw_root) and not os.path.isdir(raw_root):
        raise NotADirectoryError(f"{where} {raw_root} is a file, not a folder: give the raw root folder that holds "
                                 f"(or will hold) the DatasetXXX_Name folders")
    return raw_root


def cmd_synthetic(args) -> int:
    from nnunet_proto.data.raw_io import parse_dataset_arg
    from nnunet_proto.data.synthetic import SyntheticSpec, write_synthetic_dataset

    dataset_id, name = parse_dataset_arg(args.dataset_id, args.name)
    spec = SyntheticSpec(dataset_id=dataset_id, name=name or "Synthetic", mode=args.mode, num_labeled=args.labeled,
                         num_unlabeled=args.unlabeled, num_test=args.test,
                         shape=tuple(args.shape) if args.shape else None, seed=args.seed,
                         ignore_fraction=args.ignore_fraction)
    out = write_synthetic_dataset(spec, _raw_root(args), overwrite=args.overwrite)
    print(f"wrote {out} ({spec.num_labeled} labeled, {spec.num_unlabeled} unlabeled, {spec.num_test} test cases)")
    return 0


def cmd_preprocess_unlabeled(args) -> int:
    from nnunet_proto.data.unlabeled_preprocessing import preprocess_unlabeled

    summary = preprocess_unlabeled(args.dataset, args.configurations, args.plans, args.num_processes, args.overwrite,
                                   skip_bad=args.skip_bad)
    for cfg, s in summary.items():
        extra = "".join(f", {len(s[k])} {k}" for k in ("vanished", "changed", "skipped") if s[k])
        print(f"{cfg}: {s['num_cases']} unlabeled cases ({s['new']} new{extra}) in {s['folder']}")
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
    out, written = apply_patch_file(pre, args.patch, args.source_plans, overwrite=args.overwrite)
    print(f"{'wrote' if written else 'unchanged (already up to date):'} {out}; train with -p {out.stem}")
    return 0


def cmd_convert_h5(args) -> int:
    import json

    from nnunet_proto.data.convert_h5 import FORMATS, convert_h5_dataset, convert_h5_unlabeled
    from nnunet_proto.data.raw_io import parse_dataset_arg

    dataset_id, name = parse_dataset_arg(args.dataset_id, args.name)
    raw_root = _raw_root(args)
    fmt = FORMATS[args.format]
    if args.unlabeled:
        if args.test_count or args.test_list or args.name:
            raise ValueError("--unlabeled adds images to an existing dataset: --test-count, --test-list and "
                             "--name do not apply")
        out, written = convert_h5_unlabeled(fmt, Path(args.input_dir), Path(raw_root), dataset_id,
                                            args.spacing, args.overwrite)
        print(f"wrote {len(written)} unlabeled images into {out / 'imagesUnlabeled'}; next: nnunet_proto "
              f"preprocess-unlabeled -d {dataset_id}")
        return 0
    out = convert_h5_dataset(fmt, Path(args.input_dir), Path(raw_root), dataset_id,
                             name or fmt.key.upper(), args.spacing, args.test_count, args.test_list,
                             args.seed, args.overwrite)
    info = json.loads((out / "dataset.json").read_text())
    test = info["nnunet_proto"]["test"]
    print(f"wrote {out} ({info['numTraining']} training cases, {len(test['cases'])} test cases from "
          f"{test['count']} {test['unit']}s; spacing (z, y, x) {info['nnunet_proto']['spacing_zyx_mm']} mm)")
    return 0


def _check_outputs_writable(paths: List[Path], overwrite: bool) -> None:
    """Before any work: refuse existing output files unless ``overwrite`` and prove that they can be written.

    The folder is created and a temporary file written into it (and existing files opened for writing), so
    a read-only or missing location fails now, naming the path, instead of after the evaluation.
    """
    import tempfile

    existing = [p for p in paths if os.path.lexists(p)]
    folders = [p for p in existing if p.is_dir()]
    if folders:
        raise IsADirectoryError(f"-o: {folders[0]} is a folder, where a result file would be written; choose "
                                f"another -o")
    if existing and not overwrite:
        raise FileExistsError(f"{' and '.join(map(str, existing))} already exist{'s' if len(existing) == 1 else ''} "
                              f"(evaluate writes {paths[0].name} and {paths[1].name}, one stem). Pass --overwrite "
                              f"to replace {'it' if len(existing) == 1 else 'them'}, or choose another -o.")
    parent = paths[0].parent
    if parent.exists() and not parent.is_dir():
        raise NotADirectoryError(f"-o: {parent} is a file, not a folder; choose another -o")
    later = "nothing was evaluated; choose another -o"
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise type(e)(e.errno, f"cannot create the output folder ({e.strerror}); {later}",
                      e.filename or str(parent)) from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".nnunet_proto_write_test_", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise type(e)(e.errno, f"cannot write into this folder ({e.strerror}); {later}", str(parent)) from None
    for p in existing:  # --overwrite: they must be replaceable
        try:
            open(p, "r+b").close()
        except OSError as e:
            raise type(e)(e.errno, f"cannot be replaced ({e.strerror}); {later}", str(p)) from None


def cmd_evaluate(args) -> int:
    from nnunet_proto.evaluation.metrics import evaluate_folders, format_mean_table, result_paths, write_results

    # resolve, create and test the outputs before the possibly long evaluation, so a bad -o fails at once
    json_path, csv_path = result_paths(args.output, args.prediction)
    _check_outputs_writable([json_path, csv_path], args.overwrite)
    results = evaluate_folders(args.reference, args.prediction, args.labels, num_processes=args.num_processes,
                               progress=True)
    json_path, csv_path = write_results(results, json_path)
    print(format_mean_table(results))
    print(f"wrote {json_path} and {csv_path}", file=sys.stderr)
    return 0


def cmd_benchmark(args) -> int:
    import dataclasses
    import shlex

    from nnunet_proto.benchmark.runner import forget_trainers, run_benchmark
    from nnunet_proto.benchmark.spec import SPEC_FILE, BenchmarkSpec
    from nnunet_proto.training.compat import nnUNet_results, require_env_path

    results = Path(args.results_dir) if args.results_dir else \
        Path(require_env_path(nnUNet_results)) / "nnunet_proto_benchmarks" / args.name
    report_dir = Path(args.output) if args.output else results / "report"
    spec_file = results / SPEC_FILE
    if args.export_runs or args.import_runs:
        return _carry_runs(args, results, report_dir)
    if args.forget or args.report_only:
        if not spec_file.is_file():
            raise FileNotFoundError(f"no benchmark in {results} ({SPEC_FILE} is missing): nothing has run there yet. "
                                    f"Start it without --report-only/--forget, or check --name/--results-dir.")
    if args.forget:
        dropped = forget_trainers(results, args.forget)
        print(f"dropped {len(dropped)} run(s) of {', '.join(args.forget)} from {results / 'runs.json'} (their "
              f"folders under {results / 'runs'} are kept)", file=sys.stderr)
    if args.forget or args.report_only:
        if not (results / "runs.json").is_file():
            raise FileNotFoundError(f"no run of the benchmark in {results} has started yet (runs.json is missing), so "
                                    f"there is nothing to report. Run it without --report-only first.")
        from nnunet_proto.benchmark.report import write_report

        # the saved spec: the settings the runs were made with (only --notes can be changed here)
        spec = BenchmarkSpec.from_json(spec_file.read_text())
        if args.notes:
            spec = dataclasses.replace(spec, notes=args.notes)
        print(write_report(spec, results, report_dir))
        return 0
    missing = [flag for flag, value in (("-d", args.dataset), ("--labeled", args.labeled), ("--epochs", args.epochs))
               if value is None]
    if missing:
        raise ValueError(f"the following arguments are required to run a benchmark: {', '.join(missing)} "
                         f"(see nnunet_proto benchmark --help)")
    spec = _benchmark_spec(args, extra={"command": "nnunet_proto " + shlex.join(sys.argv[1:])})
    _check_cpu_bf16(spec.precision, spec.device, args.allow_slow_bf16)
    run_benchmark(spec, results, report_dir, reevaluate=args.reevaluate_test_set)
    return 0


def _carry_runs(args, results: Path, report_dir: Path) -> int:
    """--export-runs / --import-runs (benchmark/records.py), then, after an import, the report."""
    from nnunet_proto.benchmark.records import bundle_spec, export_runs, import_runs
    from nnunet_proto.benchmark.report import write_report
    from nnunet_proto.benchmark.spec import SPEC_FILE, BenchmarkSpec
    from nnunet_proto.training.compat import nnUNet_preprocessed, require_env_path

    if args.export_runs and args.import_runs:
        raise ValueError("--export-runs and --import-runs: give one of them per command")
    spec_file = results / SPEC_FILE
    saved = BenchmarkSpec.from_json(spec_file.read_text()) if spec_file.is_file() else None
    if args.export_runs:
        if saved is None:
            raise FileNotFoundError(f"no benchmark in {results} ({SPEC_FILE} is missing): nothing to export; check "
                                    f"--name/--results-dir")
        pre = Path(require_env_path(nnUNet_preprocessed)) / _dataset_name(saved.dataset)
        done = export_runs(results, Path(args.export_runs), pre)
        print(f"exported {len(done['exported'])} finished run(s) of {results} to {args.export_runs}"
              + (f"; left out {len(done['unfinished'])} unfinished: {', '.join(done['unfinished'])}"
                 if done["unfinished"] else ""), file=sys.stderr)
        return 0
    dataset = _dataset_name((saved or bundle_spec(Path(args.import_runs))).dataset)
    images, labels = _test_folders(args, dataset, saved)  # the test set the runs must have been evaluated on
    pre = Path(require_env_path(nnUNet_preprocessed)) / dataset
    done = import_runs(results, Path(args.import_runs), pre, Path(images), Path(labels), saved)
    for key, what in (("imported", "imported"), ("kept", "already finished here, kept"),
                      ("in_progress", "started here, left alone")):
        if done[key]:
            print(f"{what}: {len(done[key])} run(s): {', '.join(done[key])}", file=sys.stderr)
    print(write_report(BenchmarkSpec.from_json(spec_file.read_text()), results, report_dir))
    return 0


def _check_cpu_bf16(precision: str, device: str, allow_slow: bool) -> None:
    """A CPU bf16 benchmark on a CPU without bf16 kernels is refused before any run starts (unless allowed)."""
    from nnunet_proto.training.precision import cpu_bf16_supported, slow_cpu_bf16_message

    if precision == "bf16" and device.startswith("cpu") and not cpu_bf16_supported():
        message = ("--precision bf16: " + slow_cpu_bf16_message() + ": run the benchmark with --precision fp32 under "
                   "another --name (a benchmark keeps one precision for every run; scripts/acdc_benchmark.sh: "
                   "NNUNET_PROTO_PRECISION=fp32), or add --allow-slow-bf16 to go on anyway")
        if not allow_slow:
            raise ValueError(message)
        print("WARNING: " + message, file=sys.stderr)


def _benchmark_spec(args, extra: Optional[dict] = None) -> "BenchmarkSpec":  # noqa: F821
    from nnunet_proto.benchmark.spec import CONTROL, SELF_TRAINING, BenchmarkSpec

    test_images, test_labels = _test_folders(args, args.dataset)
    return BenchmarkSpec(
        dataset=args.dataset, configuration=args.configuration, plans=args.plans,
        trainers=tuple(dict.fromkeys([*args.trainers, *([SELF_TRAINING] if args.self_training else [])])),
        amounts=tuple(args.labeled), seeds=tuple(args.seeds), test_images=test_images,
        test_labels=test_labels, epochs=args.epochs, iterations_per_epoch=args.iterations,
        val_iterations_per_epoch=args.val_iterations, group_regex=args.group_regex, base_fold=args.base_fold,
        device=_checked_device(args.device) if args.device else _default_device(), checkpoint=args.checkpoint,
        run_validation=not args.no_validation,
        control=None if args.no_control else CONTROL, precision=args.precision,
        test_time_mirroring=not args.disable_tta, labels=tuple(args.labels) if args.labels else None,
        name=args.name, notes=args.notes or "", extra=extra or {}, equal_compute=args.equal_compute,
        equal_compute_source=args.equal_compute_source or "")


def _test_folders(args, dataset: str, saved=None) -> tuple:
    """A benchmark's test images and labels: --test-images/--test-labels, else the saved benchmark's, else
    nnUNet_raw/<dataset>/imagesTs and labelsTs."""
    from nnunet_proto.training.compat import nnUNet_raw

    raw = Path(nnUNet_raw.get()) / _dataset_name(dataset) if nnUNet_raw.is_set() else None
    images = args.test_images or (saved.test_images if saved else str(raw / "imagesTs") if raw else None)
    labels = args.test_labels or (saved.test_labels if saved else str(raw / "labelsTs") if raw else None)
    if not images or not labels:
        raise ValueError("give --test-images and --test-labels (or set nnUNet_raw so that imagesTs/labelsTs are used)")
    return images, labels


def _checked_device(device: str) -> str:
    """``-device`` checked before any run starts: a torch device type this machine has."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"-device {device!r} is not a torch device; use cpu, cuda or cuda:N (as nnUNetv2_train "
                         f"-device)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"-device {device}: no CUDA device is available on this machine; use -device cpu")
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"-device {device}: nnU-Net trains on cpu, cuda or mps, not {parsed.type}")
    return device


def _default_device() -> str:
    """nnU-Net's default: cuda when available, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _teacher(args) -> "Teacher":  # noqa: F821
    from nnunet_proto.data.pseudo_labels import Teacher

    return Teacher(trainer=args.trainer, plans=args.plans, configuration=args.configuration, fold=args.fold,
                   checkpoint=args.checkpoint, use_mirroring=not args.disable_tta)


def cmd_pseudo_label(args) -> int:
    from nnunet_proto.data.pseudo_labels import make_pseudo_labels

    s = make_pseudo_labels(args.dataset, _teacher(args), args.round, args.drop_least_confident, args.postprocessing,
                           overwrite=args.overwrite, skip_bad=args.skip_bad, device=args.device or _default_device())
    conf = s["confidence"]
    order = s["ranking"]
    show = order if len(order) <= 10 else order[:5] + ["..."] + order[-5:]
    print("confidence (mean max-softmax in the predicted foreground), most confident first: "
          + ", ".join(c if c == "..." else f"{c} {conf[c]:.3f}" for c in show), file=sys.stderr)
    pp = s["postprocessing"]
    print(f"postprocessing: {', '.join(x['function'] for x in pp['steps']) or 'none'}"
          + (f" ({pp['note']})" if pp.get("note") else f" ({pp['file']})"), file=sys.stderr)
    extra = "".join(f", {len(s[k])} {k}" for k in ("redone", "vanished", "skipped") if s[k])
    print(f"{s['cases']} pseudo labels ({s['new']} predicted now{extra}) in {s['folder']}; "
          f"{len(s['dropped'])} least confident left out by the student (share {args.drop_least_confident})")
    return 0


def cmd_self_train(args) -> int:
    from nnunet_proto.training.self_train import describe_result, self_train

    names = self_train(args.dataset, _teacher(args), args.rounds, args.student, args.drop_least_confident,
                       device=args.device or _default_device())
    print(describe_result(args.dataset, names, args.plans, args.configuration, args.fold))
    return 0


def cmd_trainers_path(args) -> int:
    print(trainers_path())
    return 0


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= ``minimum`` (argparse's message then names the flag)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


_non_negative_int = _int_at_least(0, "a non-negative integer")
_positive_int = _int_at_least(1, "a positive integer")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the example's line breaks and appends "(default: ...)" to every option that has a default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("%(default)" not in text and action.option_strings and action.default is not None
                and action.default is not False and action.default is not argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def _add(sub, name: str, summary: str, example: str, func) -> argparse.ArgumentParser:
    """A subcommand with a one-line description, defaults shown in --help, and one example."""
    s = sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".",
                       epilog="example:\n  " + example, formatter_class=_HelpFormatter)
    s.set_defaults(func=func)
    return s


def build_parser() -> argparse.ArgumentParser:
    from nnunet_proto import __version__

    p = argparse.ArgumentParser(prog="nnunet_proto", description="Semi-supervised nnU-Net v2 tools: data "
                                "preparation, label-scarce splits, evaluation and benchmarks around nnU-Net's own "
                                "commands.", formatter_class=_HelpFormatter,
                                epilog="run `nnunet_proto COMMAND --help` for a command's options and an example")
    p.add_argument("--version", action="version", version=f"nnunet_proto {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = _add(sub, "synthetic", "write a synthetic multi-class dataset in nnU-Net raw format",
             "nnunet_proto synthetic -d 901 --mode 2d --labeled 24 --unlabeled 40 --test 10", cmd_synthetic)
    s.add_argument("-d", "--dataset-id", required=True, help="dataset id (901) or name (Dataset901_Synthetic)")
    s.add_argument("--name", help="dataset name (default: from -d DatasetXXX_Name, else Synthetic)")
    s.add_argument("--mode", choices=["2d", "3d"], default="2d",
                   help="2d: thick-slice stacks (train the 2d configuration); 3d: near-isotropic volumes")
    s.add_argument("--labeled", type=_non_negative_int, default=24, help="cases in imagesTr/labelsTr")
    s.add_argument("--unlabeled", type=_non_negative_int, default=0, help="cases in imagesUnlabeled")
    s.add_argument("--test", type=_non_negative_int, default=0, help="cases in imagesTs/labelsTs")
    s.add_argument("--shape", type=_positive_int, nargs=3, metavar=("Z", "Y", "X"),
                   help="image shape (default: 6 64 64 in 2d mode, 32 40 40 in 3d mode)")
    s.add_argument("--seed", type=_non_negative_int, default=0, help="random seed of the generator")
    s.add_argument("--ignore-fraction", type=float, default=0.0,
                   help="simulate sparse annotation: a box covering this fraction of each slice of the labeled "
                        "cases gets nnU-Net's ignore label")
    s.add_argument("-o", "--output", help="raw root folder (default: $nnUNet_raw)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")

    s = _add(sub, "preprocess-unlabeled", "verify and preprocess nnUNet_raw/DatasetXXX/imagesUnlabeled with the "
             "plans' own preprocessor (re-runs follow the folder)",
             "nnunet_proto preprocess-unlabeled -d 901 -c 2d 3d_fullres --skip-bad", cmd_preprocess_unlabeled)
    s.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    s.add_argument("-c", "--configurations", nargs="+",
                   help="configurations (default: those of the plans whose labeled data is preprocessed, cascade "
                        "stages excluded)")
    s.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier")
    s.add_argument("-np", "--num-processes", type=int, default=1, help="cases preprocessed in parallel")
    s.add_argument("--overwrite", action="store_true",
                   help="rebuild the preprocessed unlabeled folder (written beside the old one, swapped in only on "
                        "success)")
    s.add_argument("--skip-bad", action="store_true",
                   help="skip corrupt or degenerate images (constant, mostly zeros, smaller than half the patch) "
                        "with a warning instead of refusing")

    s = _add(sub, "make-splits", "append a label-scarce fold to splits_final.json and print its number (only the "
             "number goes to stdout)",
             "fold=$(nnunet_proto make-splits -d 27 --labeled 10% --seed 0 --group-regex '(patient\\d+)')",
             cmd_make_splits)
    s.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    s.add_argument("--labeled", required=True, help="count (8) or percentage (10%%) of the base fold's training "
                                                      "cases (of groups with --group-regex)")
    s.add_argument("--seed", type=_non_negative_int, default=0, help="picks the labeled cases")
    s.add_argument("--group-regex", help="cases whose first capture group matches stay together, e.g. "
                                         "'(patient\\d+)' keeps both ACDC frames of a patient on one side")
    s.add_argument("--base-fold", type=_non_negative_int, default=0, help="nnU-Net fold whose val cases are reused")

    s = _add(sub, "plans-patch", "derive a plans file from nnUNetPlans with a patch from plans/",
             "nnunet_proto plans-patch -d 27 plans/acdc_2d_cpu.json", cmd_plans_patch)
    s.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    s.add_argument("patch", help="patch JSON file, e.g. plans/acdc_2d_cpu.json")
    s.add_argument("--source-plans", default="nnUNetPlans", help="plans the patch is applied to")
    s.add_argument("--overwrite", action="store_true",
                   help="replace an existing plans file of the patch's plans_name that has other content (the same "
                        "content is left alone; the source plans are never replaced)")

    s = _add(sub, "benchmark", "train every trainer and plain nnU-Net on the same label-scarce folds, predict and "
             "evaluate a test set, write a report (resumable)",
             "nnunet_proto benchmark -d 27 -c 2d -p nnUNetPlans_cpu -tr nnUNetTrainerCPCL --labeled 2 4 "
             "--epochs 20 --iterations 50 --name acdc", cmd_benchmark)
    s.add_argument("-d", "--dataset", help="dataset id or name (required unless --report-only/--forget reuse the "
                                           "saved benchmark)")
    s.add_argument("-c", "--configuration", default="2d", help="nnU-Net configuration")
    s.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier")
    s.add_argument("-tr", "--trainers", nargs="+", default=["nnUNetTrainerMeanTeacher", "nnUNetTrainerCPCL"],
                   help="semi-supervised trainers; plain nnUNetTrainer is always added")
    s.add_argument("--labeled", nargs="+", help="labeled amounts, counts or percentages (2 4 / 10%%); required to "
                                                "run")
    s.add_argument("--seeds", type=_non_negative_int, nargs="+", default=[0],
                   help="each seed picks the labeled cases and seeds training")
    s.add_argument("--epochs", type=int, help="epochs per run; required to run")
    s.add_argument("--iterations", type=int, default=250, help="iterations per epoch")
    s.add_argument("--val-iterations", type=int, default=10, help="nnU-Net's validation iterations per epoch")
    s.add_argument("--group-regex", help="keep cases of a group on one side, as in make-splits")
    s.add_argument("--base-fold", type=int, default=0, help="nnU-Net fold whose val cases are reused")
    s.add_argument("--test-images", help="test images (default: nnUNet_raw/<dataset>/imagesTs)")
    s.add_argument("--test-labels", help="test labels (default: nnUNet_raw/<dataset>/labelsTs)")
    s.add_argument("-l", "--labels", type=int, nargs="+", help="labels to evaluate (default: all foreground)")
    s.add_argument("-device", "--device", dest="device",
                   help="torch device, as nnUNetv2_train -device (default: cuda if available, else cpu)")
    s.add_argument("--checkpoint", choices=["final", "best"], default="final",
                   help="final, or nnU-Net's best on the fold's validation cases (never the test set)")
    s.add_argument("--no-validation", action="store_true", help="skip nnU-Net's final validation of each run "
                   "(then nnU-Net's postprocessing cannot be determined: post-processed numbers are missing)")
    s.add_argument("--no-control", action="store_true", help="do not run the A/A control nnUNetTrainerZeroSSL "
                   "(semi-supervised path with zero weights) next to plain nnU-Net")
    s.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="CPU training precision of every run, plain included: bf16 = bfloat16 autocast (opt-in; "
                        "NNUNET_PROTO_CPU_PRECISION, nnUNetTrainer_cpubf16)")
    s.add_argument("--allow-slow-bf16", action="store_true",
                   help="run --precision bf16 on a CPU without native bfloat16 kernels (refused otherwise: there it is "
                        "several times slower than fp32)")
    s.add_argument("--disable-tta", "--disable_tta", dest="disable_tta", action="store_true",
                   help="predict the test cases without mirroring (nnUNetv2_predict --disable_tta): 8x fewer "
                        "network passes in 3D; the same for every trainer")
    s.add_argument("--name", default="benchmark", help="benchmark name (results sub-folder)")
    s.add_argument("--results-dir", help="results folder (default: $nnUNet_results/nnunet_proto_benchmarks/<name>)")
    s.add_argument("-o", "--output", help="report folder (default: <results-dir>/report)")
    s.add_argument("--notes", help="free text for the report (what was run and why)")
    s.add_argument("--report-only", action="store_true", help="only rewrite the report from finished runs")
    s.add_argument("--self-training", action="store_true",
                   help="add the offline self-training row nnUNetTrainerSelfTraining: the plain run of the same fold "
                        "and seed pseudo-labels the unlabeled pool (mirroring, its postprocessing), the student "
                        "trains on labeled + pseudo-labeled cases with the same budget")
    s.add_argument("--equal-compute", type=float, metavar="FACTOR",
                   help="add plain nnU-Net trained for FACTOR x the steps (the measured s/step ratio of the most "
                        "expensive trainer of the comparison, rounded): the equal-compute row")
    s.add_argument("--equal-compute-source", metavar="TEXT",
                   help="where FACTOR comes from, for the report (e.g. 'nnUNetTrainerPCCS, CPU bf16, "
                        "docs/benchmarks/timing_acdc_2d_cpu.md')")
    s.add_argument("--reevaluate-test-set", action="store_true",
                   help="the test set changed since the finished runs were evaluated: evaluate them again on the new "
                        "one (their old predictions and metrics are moved to runs/<run>/superseded/; no retraining)")
    s.add_argument("--export-runs", metavar="FILE",
                   help="write the finished runs' records (per-case metrics, run info, curves; no checkpoint or "
                        "prediction) to FILE (JSON, gzip if it ends in .gz), to continue the benchmark or merge it "
                        "on another machine")
    s.add_argument("--import-runs", metavar="FILE",
                   help="add the runs of an --export-runs FILE to this benchmark (same budget, plans, test set and "
                        "folds, checked first), then write the report; resuming trains only the other runs")
    s.add_argument("--forget", nargs="+", metavar="TRAINER",
                   help="drop these trainers' runs from the benchmark (runs.json, saved spec, report); their run "
                        "folders stay on disk")

    from nnunet_proto.data.pseudo_labels import DEFAULT_DROP

    for cmd, summary, example, func in [
            ("pseudo-label", "predict the fold's unlabeled pool with a finished nnU-Net run (the teacher) into a "
             "pseudo-label set for nnUNetTrainerSelfTraining (resumable)",
             "nnunet_proto pseudo-label -d 27 -c 2d -p nnUNetPlans -f 0 -tr nnUNetTrainer", cmd_pseudo_label),
            ("self-train", "offline self-training end to end: pseudo-label with the teacher, train the student, "
             "and repeat for --rounds (resumable)",
             "nnunet_proto self-train -d 27 -c 2d -p nnUNetPlans -f 0 -tr nnUNetTrainer --rounds 2", cmd_self_train)]:
        s = _add(sub, cmd, summary, example, func)
        s.add_argument("-d", "--dataset", required=True, help="dataset id or name")
        s.add_argument("-c", "--configuration", required=True, help="configuration of the teacher and the student")
        s.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier of the teacher and the student")
        s.add_argument("-f", "--fold", type=int, required=True,
                       help="fold of the teacher run; the student trains on the same fold")
        s.add_argument("-tr", "--trainer", default="nnUNetTrainer", help="the teacher run's trainer")
        s.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth", help="the teacher's checkpoint file")
        s.add_argument("--disable-tta", "--disable_tta", dest="disable_tta", action="store_true",
                       help="predict the pseudo labels without mirroring (nnUNetv2_predict --disable_tta)")
        s.add_argument("--drop-least-confident", type=float, default=DEFAULT_DROP,
                       help="share of the least confident pseudo labels the student leaves out, in [0, 1) (the "
                            "default was chosen on ACDC validation; docs/methods/self_training.md)")
        s.add_argument("-device", "--device", dest="device", help="torch device (default: cuda if available, else "
                                                                  "cpu)")
        if cmd == "pseudo-label":
            s.add_argument("--round", type=int, default=1,
                           help="the student round this set is for (round r is learnt by nnUNetTrainerSelfTraining"
                                "_round<r>; round 1 by nnUNetTrainerSelfTraining)")
            s.add_argument("--postprocessing", default="auto",
                           help="'auto': the teacher run's nnU-Net postprocessing where it was determined "
                                "(fold_X/validation/postprocessing.pkl or crossval_results_folds_X), 'none', or a "
                                "postprocessing.pkl file")
            s.add_argument("--overwrite", action="store_true",
                           help="replace a set made by another teacher or with other settings, or a damaged one "
                                "(deletes it; a set of this teacher and settings is resumed, not redone)")
            s.add_argument("--skip-bad", action="store_true", help="skip unreadable or degenerate images with a "
                                                                   "warning instead of refusing")
        else:
            s.add_argument("--rounds", type=int, default=1, help="rounds of self-training (1 to 3); the student of "
                                                                 "round r teaches round r + 1")
            s.add_argument("--student", default="nnUNetTrainerSelfTraining",
                           help="student trainer of round 1 (a variant such as nnUNetTrainerSelfTraining_noisy, or "
                                "_scratch to train it from scratch; later rounds use "
                                "nnUNetTrainerSelfTraining_round<r>). Every default student starts from its teacher's "
                                "weights, segmentation heads included")

    _add(sub, "trainers-path", "print the folder to export as nnUNet_extTrainer",
         "export nnUNet_extTrainer=$(nnunet_proto trainers-path)", cmd_trainers_path)

    for fmt, unit, example in [("acdc", "patient", "patient001"), ("la", "case", "06SR5RBREL16DQ6M8LWS")]:
        s = _add(sub, f"convert-{fmt}", f"convert the {fmt.upper()} h5 release into an nnU-Net raw dataset",
                 f"nnunet_proto convert-{fmt} /data/{fmt}_h5 -d {'27' if fmt == 'acdc' else '28'} "
                 + ("--test-count 10 --seed 0" if fmt == "acdc" else f"--test-list {example}"), cmd_convert_h5)
        s.set_defaults(format=fmt)
        s.add_argument("input_dir", help="folder with the .h5 files")
        s.add_argument("-d", "--dataset-id", required=True,
                       help=f"dataset id (27) or name (Dataset027_{fmt.upper()})")
        s.add_argument("--name", help=f"dataset name (default: from -d DatasetXXX_Name, else {fmt.upper()})")
        s.add_argument("--spacing", type=float, nargs=3, metavar=("Z", "Y", "X"),
                       help="voxel spacing in mm (the h5 files store none; default "
                            + ("10 1.5 1.5" if fmt == "acdc" else "0.625 0.625 0.625") + ")")
        g = s.add_mutually_exclusive_group()
        g.add_argument("--test-count", type=_non_negative_int, default=0,
                       help=f"{unit}s drawn at random into imagesTs/labelsTs")
        g.add_argument("--test-list", nargs="+", metavar=unit.upper(), help=f"{unit}s for imagesTs, e.g. {example}")
        s.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the --test-count draw")
        s.add_argument("-o", "--output", help="raw root folder (default: $nnUNet_raw)")
        s.add_argument("--unlabeled", action="store_true",
                       help="images only: add the h5 images to imagesUnlabeled/ of the existing dataset -d "
                            "(labels in the files are ignored; cases already in imagesTr/imagesTs are refused)")
        s.add_argument("--overwrite", action="store_true",
                       help="replace imagesTr/labelsTr/imagesTs/labelsTs/dataset.json of an existing dataset "
                            "(with --unlabeled: replace existing images in imagesUnlabeled)")

    s = _add(sub, "evaluate", "Dice, IoU, HD95 and ASD (mm) of a prediction folder against references",
             "nnunet_proto evaluate nnUNet_raw/Dataset027_ACDC/labelsTs predictions -o results.json -l 1 2 3",
             cmd_evaluate)
    s.add_argument("reference", help="folder of reference segmentations (e.g. labelsTs)")
    s.add_argument("prediction", help="folder of predictions with the same file names (e.g. nnUNetv2_predict -o)")
    s.add_argument("-o", "--output",
                   help="x.json or x.csv (both files are written, same stem) or a folder (metrics.json + metrics.csv "
                        "in it); default: metrics.json + metrics.csv in the prediction folder")
    s.add_argument("-l", "--labels", type=int, nargs="+",
                   help="labels to evaluate (default: all foreground labels of dataset.json in either folder)")
    s.add_argument("-np", "--num-processes", type=_positive_int, default=1, help="cases evaluated in parallel")
    s.add_argument("--overwrite", action="store_true",
                   help="replace existing result files (without it, evaluate refuses to write over either file)")
    return p


#: what an interrupted command keeps, for the one line printed on Ctrl-C (the same command resumes)
_KEPT_ON_INTERRUPT = {
    "preprocess-unlabeled": "the cases finished so far are kept (recorded in the manifest; an --overwrite rebuild "
                            "in <folder>.partial, the old data untouched)",
    "benchmark": "finished runs are kept and an interrupted run continues from its last checkpoint",
    "pseudo-label": "the pseudo labels finished so far are kept (recorded in the set's manifest)",
    "self-train": "finished rounds are kept, an interrupted pseudo-labeling continues where it stopped and an "
                  "interrupted student from its last checkpoint",
}


def _os_error_message(e: OSError) -> str:
    """One line for an error of the operating system: the path first, then the reason."""
    if e.filename is None:  # raised by our own code with a message (FileNotFoundError("... names the path"))
        return str(e)
    path = os.fsdecode(e.filename) + (f" -> {os.fsdecode(e.filename2)}" if e.filename2 is not None else "")
    return f"{path}: {e.strerror or e}"


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        import shlex

        kept = _KEPT_ON_INTERRUPT.get(args.command)
        resume = f"; {kept}. Resume with: nnunet_proto {shlex.join(argv)}" if kept else ""
        print(f"\nnnunet_proto {args.command}: interrupted{resume}", file=sys.stderr)
        return 130
    except OSError as e:  # every error of the file system, with the path it concerns
        print(f"nnunet_proto {args.command}: error: {_os_error_message(e)}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, RuntimeError) as e:
        # a KeyError's str() is its repr (quoted, escaped): print the message itself
        text = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str) else e
        print(f"nnunet_proto {args.command}: error: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

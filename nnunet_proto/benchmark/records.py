"""Carry a benchmark's finished runs to another machine: export their records, import them there.

A benchmark of many trainers x amounts x seeds can take longer than one machine is available, or be split over
several machines. ``export_runs`` writes every finished run's *records* (the small JSON files the report is built
from: per-case test metrics raw and post-processed, the EMA teacher's, run info, training curves, stray-island
counts, nnU-Net's validation summary) into one JSON bundle, with what the runs were measured on: the benchmark's
spec, the test set's voxel hashes, the plans' hash and each run's labeled and validation cases. No checkpoint and
no prediction travels.

``import_runs`` puts them into the same benchmark on this machine. It refuses (nothing written) unless the budget
and precision, the plans, the test set (voxel hashes) and every run's labeled/validation cases are the same here.
An imported run counts as finished: resuming the benchmark trains only the others, and the report pairs
them with plain nnU-Net on the same test cases as any run. What an imported run cannot do is serve as a teacher or
warm start here (no checkpoint): a self-training or ``_warm`` run whose plain run was imported is refused, naming
the fix.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional

from nnunet_proto.benchmark.spec import SPEC_FILE, BenchmarkSpec, Run, load_runs, record_started, run_finished
from nnunet_proto.data.splits import write_json_atomic
from nnunet_proto.evaluation.islands import CACHE_NAME as ISLANDS_CACHE
from nnunet_proto.evaluation.islands import cached_folder_islands, stored_islands

BUNDLE_FORMAT = "nnunet_proto benchmark runs"
BUNDLE_VERSION = 1
#: in an imported run's folder: where it came from (its presence marks the run as imported)
IMPORTED_FILE = "imported.json"
#: nnU-Net's validation/summary.json of the run's fold, kept in the run folder (per-class validation Dice)
VALIDATION_SUMMARY = "validation_summary.json"
#: in a run folder: the processor of every machine that trained the run (a resumed run can have several)
TRAINING_MACHINES_FILE = "training_machines.json"
#: the stray islands of a run's final validation predictions, cached in the run folder (the folder is nnU-Net's)
VALIDATION_ISLANDS = "islands_validation.json"
#: the run folder's files the report is built from (whichever exist)
RECORD_FILES = ("metrics.json", "metrics_postprocessed.json", "metrics_teacher.json",
                "metrics_teacher_postprocessed.json", "postprocessing.json", "teacher.json", "run_info.json",
                "curves.json", "pseudo_labels.json", "islands.json", "islands_test_predictions_teacher.json",
                VALIDATION_ISLANDS, VALIDATION_SUMMARY, IMPORTED_FILE)


def prediction_islands(pred: Path, labels: List[int], cache: Optional[Path] = None,
                       dataset_json: Optional[Path] = None) -> Optional[dict]:
    """Stray-island statistics of a run's test predictions (``test_predictions`` or ``test_predictions_teacher``),
    cached beside them in the run folder (the cache travels with the records, the predictions do not), or of the
    predictions in ``pred`` cached in ``cache``: computed from the predictions when they are there, else read from
    the cache; None when neither is. ``dataset_json`` (default: the one beside the predictions) gives their file
    ending."""
    if cache is None:
        cache = pred.parent / (ISLANDS_CACHE if pred.name == "test_predictions" else
                               f"{Path(ISLANDS_CACHE).stem}_{pred.name}.json")
    if pred.is_dir():
        ds = dataset_json or pred / "dataset.json"
        ending = json.loads(ds.read_text()).get("file_ending", ".nii.gz") if ds.is_file() else ".nii.gz"
        try:
            return cached_folder_islands(pred, labels, cache, ending)
        except FileNotFoundError:
            pass
    return stored_islands(cache) if cache.is_file() else None


def validation_islands(run_dir: Path, labels: List[int]) -> Optional[dict]:
    """Stray islands of a run's final validation predictions (nnU-Net's ``fold_X/validation``, the fold's validation
    cases: what a screening is read on), cached in the run folder as :data:`VALIDATION_ISLANDS`; None when neither
    the predictions nor the cache are there (an imported run of an older version)."""
    info = run_dir / "run_info.json"
    folder = json.loads(info.read_text()).get("output_folder") if info.is_file() else None
    fold = Path(folder) if folder else run_dir / "no_output_folder"
    return prediction_islands(fold / "validation", labels, cache=run_dir / VALIDATION_ISLANDS,
                              dataset_json=fold.parent / "dataset.json")  # nnU-Net's, in the trainer folder


def epoch_durations(logging: dict) -> List[float]:
    """Seconds of each epoch from nnU-Net's epoch timestamps (a checkpoint's ``logging``, a run's curves.json)."""
    return [e - s for s, e in zip(logging.get("epoch_start_timestamps", []), logging.get("epoch_end_timestamps", []))]


def machine_name(device_type: str = "cpu") -> str:
    """What trained a run, for the cost table: the CUDA device's name, or the processor's model (``/proc/cpuinfo``,
    else ``platform``) with its logical CPU count. Time ratios between rows are only comparable on one machine."""
    if device_type == "cuda":
        import torch

        return torch.cuda.get_device_name()
    name = ""
    try:
        name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.lower().startswith("model name")), "")
    except OSError:
        pass
    return f"{name or platform.processor() or platform.machine() or 'unknown CPU'} ({os.cpu_count()} logical CPUs)"


def training_machines(run_dir: Path) -> Optional[List[str]]:
    """The machines recorded as having trained the run, or None (a run trained before the record existed)."""
    f = run_dir / TRAINING_MACHINES_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def record_training_machine(run_dir: Path, name: str) -> List[str]:
    """Add ``name`` to the run's training machines (once) before it trains, so that an interrupted run resumed
    elsewhere keeps both; returns the list."""
    names = training_machines(run_dir) or []
    if name not in names:
        names.append(name)
        write_json_atomic(run_dir / TRAINING_MACHINES_FILE, names)
    return names


def is_imported(run_dir: Path) -> bool:
    return (run_dir / IMPORTED_FILE).is_file()


def refuse_imported_teacher(plain_run: Path, trainer: str, need: str) -> None:
    """Raise if ``plain_run`` (the plain run a self-training or warm-started run needs) was imported: its weights
    are on the machine that trained it."""
    if is_imported(plain_run):
        origin = json.loads((plain_run / IMPORTED_FILE).read_text()).get("bundle", "a bundle")
        raise RuntimeError(f"{trainer} needs {need} of the plain run in {plain_run}, but that run was imported from "
                           f"{origin} without its checkpoint. Move {plain_run} aside (rename it) and run the same "
                           f"benchmark command again: plain nnU-Net then trains here first, then {trainer}.")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fold_cases(splits_file: Path, fold: int) -> dict:
    splits = json.loads(splits_file.read_text())
    if not 0 <= fold < len(splits):
        raise ValueError(f"fold {fold} is not in {splits_file} ({len(splits)} folds)")
    return {"train": sorted(splits[fold]["train"]), "val": sorted(splits[fold]["val"])}


def read_bundle(path: Path) -> dict:
    raw = path.read_bytes()
    try:
        data = json.loads(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a bundle written by 'nnunet_proto benchmark --export-runs' ({e})") from None
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{path} is not a bundle written by 'nnunet_proto benchmark --export-runs'")
    if data.get("version", 0) > BUNDLE_VERSION:
        raise ValueError(f"{path} has bundle version {data['version']}, this nnunet_proto reads up to "
                         f"{BUNDLE_VERSION}: update nnunet_proto")
    return data


def bundle_spec(path: Path) -> BenchmarkSpec:
    """The spec of the benchmark whose runs ``path`` (an --export-runs bundle) holds."""
    return BenchmarkSpec.from_json(json.dumps(read_bundle(path)["spec"]))


def export_runs(results_root: Path, out: Path, preprocessed: Path) -> dict:
    """Write the finished runs of the benchmark in ``results_root`` to ``out`` (JSON; gzip when it ends in .gz).

    ``preprocessed``: nnUNet_preprocessed/<dataset> of the benchmark (its plans and splits_final.json). Returns
    the bundle's summary (runs exported, unfinished runs left out)."""
    spec_file, runs_file = results_root / SPEC_FILE, results_root / "runs.json"
    if not spec_file.is_file() or not runs_file.is_file():
        raise FileNotFoundError(f"no benchmark runs in {results_root} ({SPEC_FILE} or runs.json missing): nothing "
                                f"to export; check --name/--results-dir")
    spec = BenchmarkSpec.from_json(spec_file.read_text())
    plans, splits = preprocessed / f"{spec.plans}.json", preprocessed / "splits_final.json"
    for f in (plans, splits):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: --export-runs records the plans and each run's labeled cases; "
                                    f"set nnUNet_preprocessed as for the benchmark")
    test_set = results_root / "test_set.json"
    entries, unfinished = [], []
    for run in load_runs(runs_file):
        d = run.dir(results_root / "runs")
        if not run_finished(d):
            unfinished.append(run.tag)
            continue
        labels = [int(lab) for lab in json.loads((d / "metrics.json").read_text())["mean"]]
        for pred in ("test_predictions", "test_predictions_teacher"):  # their island counts travel, not they
            prediction_islands(d / pred, labels)
        validation_islands(d, labels)
        files = {name: json.loads((d / name).read_text()) for name in RECORD_FILES if (d / name).is_file()}
        imported = files.get(IMPORTED_FILE)
        if VALIDATION_SUMMARY not in files:  # runs finished before run_one kept a copy in the run folder
            folder = files.get("run_info.json", {}).get("output_folder")
            summary = Path(folder) / "validation" / "summary.json" if folder else None
            if summary is not None and summary.is_file():
                files[VALIDATION_SUMMARY] = json.loads(summary.read_text())
        entries.append({"run": run.to_json(), "tag": run.tag,
                        "fold_cases": imported["fold_cases"] if imported else _fold_cases(splits, run.fold),
                        "files": files})
    if not entries:
        raise ValueError(f"no finished run in {results_root} ({len(unfinished)} unfinished): nothing to export")
    bundle = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION,
              "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.platform(), "results_root": str(results_root),
              "spec": json.loads(spec_file.read_text()),
              "test_set": json.loads(test_set.read_text()) if test_set.is_file() else None,
              "plans_sha256": _sha256(plans), "runs": entries}
    text = json.dumps(bundle, separators=(",", ":"), allow_nan=True).encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(gzip.compress(text, mtime=0) if out.name.endswith(".gz") else text)
    os.replace(tmp, out)
    return {"exported": [e["tag"] for e in entries], "unfinished": unfinished}


def import_runs(results_root: Path, bundle_file: Path, preprocessed: Path, test_images: Path, test_labels: Path,
                local_spec: Optional[BenchmarkSpec] = None) -> dict:
    """Put the runs of ``bundle_file`` into the benchmark in ``results_root`` (created if new).

    Checked first, nothing written on a mismatch: the budget (``BenchmarkSpec.budget_key``) against the benchmark
    here, the plans file's hash, the test set's voxel hashes (``test_images``/``test_labels``, the folders this
    benchmark evaluates on) and each run's labeled and validation cases against the fold this machine makes for its
    amount and seed (making that fold adds it to nnU-Net's splits file if missing, as starting the benchmark does).
    Runs already finished here are kept, runs started here are left alone (both reported).
    Returns {"imported", "kept", "in_progress"}: lists of run tags."""
    from nnunet_proto.data.leakage import test_set_identity
    from nnunet_proto.data.splits import LabeledAmount, make_label_scarce_fold
    from nnunet_proto.training.compat import load_json

    bundle = read_bundle(bundle_file)
    theirs = BenchmarkSpec.from_json(json.dumps(bundle["spec"]))
    spec_file = results_root / SPEC_FILE
    ours = local_spec or (BenchmarkSpec.from_json(spec_file.read_text()) if spec_file.is_file() else None)
    differ = theirs.budget_differences(ours) if ours is not None else {}
    if differ:
        diffs = ", ".join(f"{k}: {there!r} in the bundle, {here!r} here" for k, (there, here) in differ.items())
        raise ValueError(f"{bundle_file} holds runs of a benchmark with another setup ({diffs}); import it into "
                         f"a benchmark with the same settings (or under a new --name)")
    plans = preprocessed / f"{theirs.plans}.json"
    if not plans.is_file():
        raise FileNotFoundError(f"{plans} not found: plan, preprocess and patch the dataset here as on the machine "
                                f"that ran the bundle's runs, then import")
    if _sha256(plans) != bundle["plans_sha256"]:
        raise ValueError(f"{plans} differs from the plans the bundle's runs were trained with: their numbers would "
                         f"not be comparable with runs trained here. Apply the same plans (plans-patch) first.")
    ending = load_json(str(preprocessed / "dataset.json"))["file_ending"]
    results_root.mkdir(parents=True, exist_ok=True)
    cache = results_root / "test_leakage_hashes.json"
    here = test_set_identity(test_images, test_labels, ending, cache)
    there = bundle.get("test_set")
    if there is None or there.get("digest") != here["digest"]:
        raise ValueError(f"the bundle's runs were evaluated on another test set ({(there or {}).get('images')}, "
                         f"digest {(there or {}).get('digest')}) than {test_images} here (digest {here['digest']}): "
                         f"give the test folders they were evaluated on (--test-images/--test-labels)")
    runs_root = results_root / "runs"
    plan: List[tuple] = []
    out: Dict[str, list] = {"imported": [], "kept": [], "in_progress": []}
    folds: Dict[tuple, int] = {}
    for entry in bundle["runs"]:
        run = Run(**entry["run"])
        key = (run.amount, run.seed)
        if key not in folds:
            folds[key], _ = make_label_scarce_fold(str(preprocessed), LabeledAmount.parse(run.amount), run.seed,
                                                   theirs.group_regex, theirs.base_fold, file_ending=ending)
        local = _fold_cases(preprocessed / "splits_final.json", folds[key])
        if local != entry["fold_cases"]:
            raise ValueError(f"run {entry['tag']} was trained on other cases than the fold this machine makes for "
                             f"labeled {run.amount}, seed {run.seed} (fold {folds[key]}): labeled "
                             f"{entry['fold_cases']['train']} there, {local['train']} here. Import into the same "
                             f"dataset conversion (same cases, --group-regex and --base-fold).")
        run = Run(run.trainer, run.amount, run.seed, folds[key], run.steps_factor)
        d = run.dir(runs_root)
        if run_finished(d):
            out["kept"].append(run.tag)
        elif d.is_dir() and any(d.iterdir()):
            out["in_progress"].append(run.tag)
        else:
            plan.append((run, entry))
    # every check passed: write
    if ours is None:
        spec_file.write_text(_with_test_folders(theirs, test_images, test_labels).to_json())
    record = results_root / "test_set.json"
    if not record.is_file():
        record.write_text(json.dumps(here, indent=2))
    origin = {"bundle": str(bundle_file), "exported_at": bundle.get("exported_at"), "machine": bundle.get("machine"),
              "results_root": bundle.get("results_root")}
    for run, entry in plan:
        d = run.dir(runs_root)
        d.mkdir(parents=True, exist_ok=True)
        files = dict(entry["files"])
        files[IMPORTED_FILE] = files.get(IMPORTED_FILE) or {**origin, "fold_cases": entry["fold_cases"]}
        # postprocessing.json last: it marks the run finished (spec.RUN_DONE_FILES)
        for name in sorted(files, key=lambda n: n == "postprocessing.json"):
            (d / name).write_text(json.dumps(files[name], indent=1))
        record_started(results_root / "runs.json", run)
        out["imported"].append(run.tag)
    return out


def _with_test_folders(spec: BenchmarkSpec, test_images: Path, test_labels: Path) -> BenchmarkSpec:
    """The bundle's spec with this machine's test folders (the ones its digest was checked against)."""
    import dataclasses

    return dataclasses.replace(spec, test_images=str(test_images), test_labels=str(test_labels))

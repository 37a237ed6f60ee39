"""``nnunet_proto benchmark``: every trainer against plain nnU-Net on the same labeled cases.

For each labeled amount and seed a label-scarce fold is created with make-splits (the seed picks the
labeled cases *and* seeds training), then every trainer (plain nnUNetTrainer always included) is
trained on that fold with the same budget, the test images are predicted with nnU-Net's predictor
and evaluated. Each run is a separate process (``run_one``) whose output streams to the console and
to ``<run>/log.txt``. Finished runs are skipped and an interrupted run continues from its last epoch,
so re-running the same command resumes the benchmark. Finally the report folder is (re)written.

Before the first run every trainer class is looked up (a misspelled ``-tr`` fails at once) and the
test set is checked for leakage into the training data (``nnunet_proto.data.leakage``). A run is
recorded in ``runs.json`` only when it starts; ``forget_trainers`` drops a trainer's runs again.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from time import perf_counter, strftime
from typing import Iterator, List, Sequence

from nnunet_proto.benchmark.lookup import find_trainer_class, trainer_warm_starts
from nnunet_proto.benchmark.spec import (
    SPEC_FILE,
    STEPS_MARK,
    BenchmarkSpec,
    Run,
    load_runs,
    record_started,
    run_finished,
)
from nnunet_proto.data.pseudo_labels import PSEUDO_LABELS_ENV
from nnunet_proto.paths import ext_trainer_paths, trainers_path
from nnunet_proto.training.precision import PRECISION_ENV


def _repo_trainers() -> str:
    return str(trainers_path())


def resolve_trainers(names: Sequence[str]) -> None:
    """Look up every trainer class the way nnUNetv2_train does; raise listing the unknown ones (with suggestions).

    Runs before the first training so that a misspelled ``-tr`` fails at once, not hours later.
    """
    unknown = [name for name in names if find_trainer_class(name) is None]
    if unknown:
        known = sorted({m for p in Path(_repo_trainers()).glob("*.py")
                        for m in re.findall(r"^class (\w+)\(", p.read_text(), flags=re.M)} | {"nnUNetTrainer"})
        hints = [f"{n} (did you mean {', '.join(difflib.get_close_matches(n, known, 3)) or 'none close'}?)"
                 for n in unknown]
        raise ValueError(f"unknown trainer(s) {', '.join(hints)}: not found in nnunetv2 or nnUNet_extTrainer "
                         f"({ext_trainer_paths()}). Nothing was run. This repository's trainers: {', '.join(known)}")


def forget_trainers(results_root: Path, trainers: Sequence[str]) -> List[Run]:
    """Drop every run of ``trainers`` from runs.json and from the saved spec; returns the dropped runs.

    Their run folders stay on disk (adding the trainer again later finds its finished runs).
    """
    runs_file, spec_file = results_root / "runs.json", results_root / SPEC_FILE
    known = load_runs(runs_file) if runs_file.is_file() else []
    present = sorted({r.trainer for r in known})
    unknown = [t for t in trainers if t not in present]
    if unknown:
        hints = [f"{t} (did you mean {', '.join(difflib.get_close_matches(t, present, 3)) or 'none close'}?)"
                 for t in unknown]
        raise ValueError(f"--forget: no run of {', '.join(hints)} in {runs_file}; nothing was dropped. Trainers with "
                         f"runs: {', '.join(present) or 'none'}")
    dropped = [r for r in known if r.trainer in trainers]
    tmp = runs_file.with_suffix(".tmp")
    tmp.write_text(json.dumps([r.to_json() for r in known if r.trainer not in trainers], indent=2))
    os.replace(tmp, runs_file)
    if spec_file.is_file():
        spec = BenchmarkSpec.from_json(spec_file.read_text())
        spec_file.write_text(dataclasses.replace(spec, trainers=tuple(t for t in spec.trainers
                                                                       if t not in trainers)).to_json())
    return dropped


def prepare(spec: BenchmarkSpec, results_root: Path, reevaluate: bool = False) -> List[Run]:
    """Check inputs (trainer classes, test leakage, the test set of finished runs), create the folds, save the spec;
    returns the runs in execution order. Nothing is written before every check passed (``reevaluate``: finished
    runs evaluated on another test set are set aside for re-evaluation, see ``check_test_set``)."""
    from nnunet_proto.data.leakage import check_test_leakage
    from nnunet_proto.data.splits import LabeledAmount, make_label_scarce_fold
    from nnunet_proto.training.compat import (
        load_json,
        maybe_convert_to_dataset_name,
        nnUNet_preprocessed,
        nnUNet_raw,
        require_env_path,
    )

    name = maybe_convert_to_dataset_name(spec.dataset)
    pre = Path(require_env_path(nnUNet_preprocessed)) / name
    if not (pre / f"{spec.plans}.json").is_file():
        raise FileNotFoundError(f"{pre / (spec.plans + '.json')} not found: plan and preprocess the dataset (and apply "
                                f"the plan patch) first")
    for folder in (spec.test_images, spec.test_labels):
        if not Path(folder).is_dir() or not any(Path(folder).iterdir()):
            raise FileNotFoundError(f"test folder {folder} is missing or empty")
    spec_file = results_root / SPEC_FILE
    if spec_file.is_file():
        differ = BenchmarkSpec.from_json(spec_file.read_text()).budget_differences(spec)
        if differ:
            diffs = ", ".join(f"{k}: {then!r} then, {now!r} now" for k, (then, now) in differ.items())
            raise ValueError(f"{results_root} holds a benchmark with another setup ({diffs}); resume it with the same "
                             f"settings or use another --name")
    resolve_trainers(spec.all_trainers)
    needs_plain = [t for t in spec.all_trainers if trainer_warm_starts(t)]  # run right after plain (runs_of)
    ending = load_json(str(pre / "dataset.json"))["file_ending"]
    raw = Path(nnUNet_raw.get()) / name if nnUNet_raw.is_set() and (Path(nnUNet_raw.get()) / name).is_dir() else None
    results_root.mkdir(parents=True, exist_ok=True)
    cache = results_root / "test_leakage_hashes.json"
    # the pseudo-label sets of this benchmark and the user's own (nnunet_proto pseudo-label) count as training data
    sets = [results_root / "pseudo_labels" / name, pre / "pseudo_labels"]
    print("[benchmark] " + check_test_leakage(Path(spec.test_images), Path(spec.test_labels), ending, pre, raw,
                                              cache, sets), flush=True)
    check_test_set(spec, results_root, ending, cache, reevaluate)
    runs = []
    for amount in spec.amounts:
        for seed in spec.seeds:
            fold, _ = make_label_scarce_fold(str(pre), LabeledAmount.parse(amount), seed, spec.group_regex,
                                             spec.base_fold, file_ending=ending)
            runs += spec.runs_of(amount, seed, fold, needs_plain)
    spec_file.write_text(spec.to_json())
    # runs.json lists the runs that have started (also those of earlier invocations: other seeds or trainers);
    # each run is added when it starts (record_started)
    return runs


TEST_SET_FILE = "test_set.json"
#: what a run's evaluation on the test set wrote (set aside when the test set changes; training is kept)
EVALUATION_OUTPUTS = ("test_predictions", "test_predictions_postprocessed", "test_predictions_teacher",
                      "test_predictions_teacher_postprocessed", "metrics.json", "metrics.csv",
                      "metrics_postprocessed.json", "metrics_postprocessed.csv", "metrics_teacher.json",
                      "metrics_teacher.csv", "metrics_teacher_postprocessed.json", "metrics_teacher_postprocessed.csv",
                      "postprocessing.json", "teacher.json", "islands.json", "islands_test_predictions_teacher.json")


def check_test_set(spec: BenchmarkSpec, results_root: Path, file_ending: str, cache_file: Path,
                   reevaluate: bool = False) -> None:
    """The finished runs were evaluated on this test set (file names and voxel hashes of images and labels).

    A benchmark resumed with another test set would report the old numbers under the new name: refused, naming
    the command that evaluates the finished runs again (``reevaluate``: their evaluation outputs move to
    ``runs/<run>/superseded/<old test set>/``, nothing is deleted, training is kept). Only the folders' paths
    changed (same files): the record follows them.
    """
    from nnunet_proto.data.leakage import test_set_identity

    record = results_root / TEST_SET_FILE
    now = test_set_identity(Path(spec.test_images), Path(spec.test_labels), file_ending, cache_file)
    old = json.loads(record.read_text()) if record.is_file() else None
    evaluated = [d for d in (results_root / "runs").glob("*/*") if (d / "metrics.json").is_file()]
    if old is not None and old.get("digest") != now["digest"] and evaluated:
        if not reevaluate:
            gone = sorted(set(old.get("cases", {})) - set(now["cases"]))
            new = sorted(set(now["cases"]) - set(old.get("cases", {})))
            changed = sorted(c for c in set(now["cases"]) & set(old.get("cases", {}))
                             if now["cases"][c] != old["cases"][c])
            raise ValueError(
                f"{len(evaluated)} finished run(s) in {results_root} were evaluated on another test set "
                f"({old.get('images')}, {len(old.get('cases', {}))} cases; now {spec.test_images}, "
                f"{len(now['cases'])} cases: {len(new)} new, {len(gone)} gone, {len(changed)} with other voxels"
                f"{', e.g. ' + (new + gone + changed)[0] if new + gone + changed else ''}). Their numbers would be "
                f"reported under the new test set. Run the same command with --reevaluate-test-set to evaluate them "
                f"again on it (no retraining; the old predictions and metrics are kept under runs/<run>/superseded/),"
                f" or use another --name.")
        for d in evaluated:
            target = d / "superseded" / old["digest"]
            target.mkdir(parents=True, exist_ok=True)
            for name in EVALUATION_OUTPUTS:
                if (d / name).exists():
                    os.replace(d / name, target / name)
        print(f"[benchmark] the test set changed: {len(evaluated)} finished run(s) are evaluated again (old results "
              f"under runs/<run>/superseded/{old['digest']})", flush=True)
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(now, indent=2))
    os.replace(tmp, record)


@contextlib.contextmanager
def folder_progress(folder: Path, pattern: str, total: int, desc: str, interval_s: float = 5.0) -> Iterator[None]:
    """Show a tqdm bar (stderr) of how many files matching ``pattern`` appear in ``folder`` while the body runs.

    For work that writes one file per item but offers no progress hook (nnU-Net's predict_from_files).
    """
    from tqdm import tqdm

    before = len(list(folder.glob(pattern))) if folder.is_dir() else 0
    stop = threading.Event()
    bar = tqdm(total=total, desc=desc, unit="case", mininterval=interval_s)

    def poll() -> None:
        while not stop.wait(interval_s):
            n = (len(list(folder.glob(pattern))) if folder.is_dir() else 0) - before
            bar.update(max(0, min(n, total) - bar.n))

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
        bar.update(total - bar.n)
    finally:
        stop.set()
        thread.join()
        bar.close()


def keep_saved_settings(spec: BenchmarkSpec, results_root: Path) -> BenchmarkSpec:
    """``spec`` with the saved benchmark's equal-compute factor and notes where a resume does not give them.

    A stage resumed without ``--equal-compute`` (or ``--notes``) would otherwise save the spec without it, and the
    report would lose its equal-compute section although that row's runs are finished (``--report-only`` and
    ``--export-runs`` read the saved spec). A factor or notes given anew replace the saved ones."""
    spec_file = results_root / SPEC_FILE
    if not spec_file.is_file():
        return spec
    saved = BenchmarkSpec.from_json(spec_file.read_text())
    keep = {}
    if spec.equal_compute is None and saved.equal_compute is not None:
        keep.update(equal_compute=saved.equal_compute, equal_compute_source=saved.equal_compute_source)
    if not spec.notes and saved.notes:
        keep["notes"] = saved.notes
    return dataclasses.replace(spec, **keep) if keep else spec


def run_benchmark(spec: BenchmarkSpec, results_root: Path, report_dir: Path, reevaluate: bool = False) -> Path:
    """Run everything that is not finished yet, then write the report; returns the report file."""
    from nnunet_proto.benchmark.report import write_report

    spec = keep_saved_settings(spec, results_root)
    runs = prepare(spec, results_root, reevaluate)
    runs_root = results_root / "runs"
    env = dict(os.environ)
    env["nnUNet_results"] = str(results_root / "nnUNet_results")
    env["nnUNet_extTrainer"] = ext_trainer_paths()
    env.setdefault("nnUNet_compile", "f")
    env[PRECISION_ENV] = spec.precision  # every semi-supervised run; run_one maps plain to its bf16 variant
    env[PSEUDO_LABELS_ENV] = str(results_root / "pseudo_labels")  # the self-training rows' sets, per benchmark
    spec_file = results_root / SPEC_FILE
    todo = [r for r in runs if not run_finished(r.dir(runs_root))]
    for run in runs:  # finished earlier (e.g. a trainer forgotten and added again): part of the report again
        if run not in todo:
            record_started(results_root / "runs.json", run)
    print(f"[benchmark] {len(runs)} runs, {len(runs) - len(todo)} finished, {len(todo)} to do "
          f"(results in {results_root})", flush=True)
    t_start = perf_counter()
    failed = []
    for i, run in enumerate(todo, 1):
        run_dir = run.dir(runs_root)
        run_dir.mkdir(parents=True, exist_ok=True)
        elapsed = perf_counter() - t_start
        eta = f", about {elapsed / (i - 1) * (len(todo) - i + 1) / 60:.0f} min left" if i > 1 else ""
        print(f"[benchmark {strftime('%H:%M:%S')}] run {i}/{len(todo)}: {run.trainer}, labeled {run.amount}, "
              f"seed {run.seed}, fold {run.fold}{eta}", flush=True)
        record_started(results_root / "runs.json", run)
        cmd = [sys.executable, "-m", "nnunet_proto.benchmark.run_one", "--spec", str(spec_file), "--trainer",
               run.trainer, "--fold", str(run.fold), "--seed", str(run.seed), "--run-dir", str(run_dir),
               "--steps-factor", repr(run.steps_factor)]
        run_env = dict(env)
        if run.steps_factor != 1.0:  # the same trainer class on the same fold: its own nnU-Net results tree
            run_env["nnUNet_results"] = str(results_root / f"nnUNet_results{STEPS_MARK}{run.steps_factor:g}")
        with open(run_dir / "log.txt", "a") as log:
            proc = subprocess.Popen(cmd, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    bufsize=1)
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if _interesting(line):
                    print(f"    {run.trainer} {run.amount}/s{run.seed}: {line.rstrip()}", flush=True)
            code = proc.wait()
        if code != 0:  # keep going: one broken run must not waste the remaining budget
            failed.append(run)
            print(f"[benchmark] run {run.tag} FAILED (exit code {code}); see {run_dir / 'log.txt'}", flush=True)
    report = write_report(spec, results_root, report_dir, failed=[r.tag for r in failed])
    print(f"[benchmark] report: {report}", flush=True)
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed: {[r.tag for r in failed]}; their logs are in the run "
                           f"folders. Re-run the same command to retry them (finished runs are skipped).")
    return report


def _interesting(line: str) -> bool:
    keys = ("Epoch ", "train_loss", "Pseudo dice", "Epoch time", "semi-supervised terms", "RUN DONE", "resuming",
            "Mean Validation Dice", "Error", "error", "Traceback", "predicting test cases")
    return any(k in line for k in keys)

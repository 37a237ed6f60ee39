"""``nnunet_proto benchmark``: every trainer against plain nnU-Net on the same labeled cases.

For each labeled amount and seed a label-scarce fold is created with make-splits (the seed picks the
labeled cases *and* seeds training), then every trainer (plain nnUNetTrainer always included) is
trained on that fold with the same budget, the test images are predicted with nnU-Net's predictor
and evaluated. Each run is a separate process (``run_one``) whose output streams to the console and
to ``<run>/log.txt``. Finished runs are skipped and an interrupted run continues from its last epoch,
so re-running the same command resumes the benchmark. Finally the report folder is (re)written.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from time import perf_counter, strftime
from typing import List

from nnunet_proto.benchmark.spec import SPEC_FILE, BenchmarkSpec, Run, load_runs
from nnunet_proto.training.precision import PRECISION_ENV


def _repo_trainers() -> str:
    from nnunet_proto.cli import trainers_path

    return str(trainers_path())


def prepare(spec: BenchmarkSpec, results_root: Path) -> List[Run]:
    """Check inputs, create the folds, save the spec; returns the runs in execution order."""
    from nnunet_proto.data.splits import LabeledAmount, make_label_scarce_fold
    from nnunet_proto.training.compat import (
        load_json,
        maybe_convert_to_dataset_name,
        nnUNet_preprocessed,
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
    results_root.mkdir(parents=True, exist_ok=True)
    spec_file = results_root / SPEC_FILE
    if spec_file.is_file():
        old = BenchmarkSpec.from_json(spec_file.read_text())
        if old.budget_key() != spec.budget_key():
            raise ValueError(f"{results_root} holds a benchmark with another setup ({old.budget_key()} vs "
                             f"{spec.budget_key()}); resume it with the same settings or use another --name")
    spec_file.write_text(spec.to_json())
    ending = load_json(str(pre / "dataset.json"))["file_ending"]
    runs = []
    for amount in spec.amounts:
        for seed in spec.seeds:
            fold, _ = make_label_scarce_fold(str(pre), LabeledAmount.parse(amount), seed, spec.group_regex,
                                             spec.base_fold, file_ending=ending)
            runs += [Run(trainer, amount, seed, fold) for trainer in spec.all_trainers]
    # earlier invocations (other seeds or trainers) stay part of the benchmark and its report
    runs_file = results_root / "runs.json"
    known = load_runs(runs_file) if runs_file.is_file() else []
    everything = known + [r for r in runs if r not in known]
    runs_file.write_text(json.dumps([r.__dict__ for r in everything], indent=2))
    return runs


def run_benchmark(spec: BenchmarkSpec, results_root: Path, report_dir: Path) -> Path:
    """Run everything that is not finished yet, then write the report; returns the report file."""
    from nnunet_proto.benchmark.report import write_report

    runs = prepare(spec, results_root)
    runs_root = results_root / "runs"
    env = dict(os.environ)
    env["nnUNet_results"] = str(results_root / "nnUNet_results")
    env["nnUNet_extTrainer"] = os.pathsep.join(p for p in (_repo_trainers(), os.environ.get("nnUNet_extTrainer"))
                                               if p)
    env.setdefault("nnUNet_compile", "f")
    env[PRECISION_ENV] = spec.precision  # every semi-supervised run; run_one maps plain to its bf16 variant
    spec_file = results_root / SPEC_FILE
    todo = [r for r in runs if not (r.dir(runs_root) / "metrics.json").is_file()]
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
        cmd = [sys.executable, "-m", "nnunet_proto.benchmark.run_one", "--spec", str(spec_file), "--trainer",
               run.trainer, "--fold", str(run.fold), "--seed", str(run.seed), "--run-dir", str(run_dir)]
        with open(run_dir / "log.txt", "a") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
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
            "Mean Validation Dice", "Error", "error", "Traceback")
    return any(k in line for k in keys)

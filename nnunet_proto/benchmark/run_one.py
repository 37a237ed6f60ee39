"""One benchmark run in its own process: train (or resume), validate, predict the test set, evaluate, postprocess.

    python -m nnunet_proto.benchmark.run_one --spec SPEC.json --trainer T --fold F --seed S --run-dir DIR

Every stage is skipped when its output exists, so an interrupted run continues where it stopped:
training resumes from checkpoint_latest.pth (written every epoch), prediction from the cases already
written, evaluation when ``metrics.json`` exists. Writes into DIR: ``metrics.json`` (+ CSV) from
``nnunet_proto evaluate``, ``run_info.json`` (seconds per epoch, peak memory, checkpoint used),
``curves.json`` (every per-epoch value the trainer logged) and, last, the postprocessing stage:

* nnU-Net's postprocessing (``nnUNetv2_determine_postprocessing``: keep the largest foreground
  component, then the largest component per class, each kept only if it raises Dice) is determined on
  this run's own validation predictions (``<fold>/validation``, references in
  ``nnUNet_preprocessed/<dataset>/gt_segmentations``), never on the test set;
* it is applied to ``test_predictions`` into ``test_predictions_postprocessed`` and evaluated into
  ``metrics_postprocessed.json``;
* ``postprocessing.json`` records the chosen steps, or why post-processed numbers are missing (a run
  without validation predictions). Its presence marks the run finished (spec.RUN_DONE_FILES), so a run
  finished by older code without this stage is completed on resume, without retraining.

Two kinds of run do more:

* an offline self-training student (``nnUNetTrainerSelfTraining...``) first has the plain run of the same fold
  pseudo-label the unlabeled pool (``pseudo_labels.make_pseudo_labels``, into the benchmark's own
  ``pseudo_labels/`` folder; ``pseudo_labels.json`` in the run folder records it and its cost);
* a teacher-student run (``checkpoint_final_teacher.pth`` in its fold folder) has its EMA teacher evaluated as its
  own row: the fold's validation cases predicted with the teacher (``validation_teacher/``), nnU-Net's
  postprocessing determined there, the test cases raw and post-processed (``metrics_teacher*.json``,
  ``teacher.json``, written before ``postprocessing.json``);
* a warm-started trainer (``stage_switch="warm_start"``, e.g. ``nnUNetTrainerBCP_warm``) starts from the finished
  plain run of the same fold: every weight of its ``checkpoint_final.pth`` (the segmentation heads included, which
  nnU-Net's ``-pretrained_weights`` leaves out; same dataset and plans, so nothing needs dropping) is loaded after
  ``initialize()``, before training, as ``-pretrained_weights`` would; ``run_info.json`` records the checkpoint
  and its sha256 (``warm_start_from``), and the cost table counts plain's training as part of the run's;
* ``--steps-factor F``: plain nnU-Net trained for F x the spec's epochs (the equal-compute row; the runner gives it
  its own nnU-Net results folder).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from time import perf_counter
from typing import Dict, List, Optional

import numpy as np
import torch

from nnunet_proto.benchmark.records import (
    VALIDATION_SUMMARY,
    epoch_durations,
    machine_name,
    record_training_machine,
    refuse_imported_teacher,
    training_machines,
)
from nnunet_proto.benchmark.spec import (
    PLAIN,
    TEACHER_CHECKPOINT,
    TEACHER_DONE_FILE,
    BenchmarkSpec,
    is_self_training,
    run_finished,
)
from nnunet_proto.data.splits import write_json_atomic
from nnunet_proto.resources import reset_rss_high_water, rss_high_water_mb
from nnunet_proto.training.base_trainer import seed_everything
from nnunet_proto.training.precision import PRECISION_ENV

#: plain nnU-Net cannot read NNUNET_PROTO_CPU_PRECISION: its bf16 twin (trainers/nnUNetTrainerBaselines.py)
BF16_PLAIN = {PLAIN: "nnUNetTrainer_cpubf16"}


def plain_trainer(spec: BenchmarkSpec) -> str:
    """The class plain nnU-Net runs as in this benchmark (its bf16 twin under CPU bf16)."""
    return BF16_PLAIN[PLAIN] if spec.precision == "bf16" else PLAIN


def pseudo_label(spec: BenchmarkSpec, fold: int, device: torch.device, teacher_run: Optional[Path] = None) -> dict:
    """The self-training row's pseudo labels: the plain run of the same fold (and seed) is the teacher; nnU-Net's
    predictor with mirroring and that run's postprocessing (determined on its validation predictions).

    ``teacher_run``: the plain row's run folder; unless that run finished (its postprocessing included), nothing is
    predicted: a teacher whose run failed after training would give pseudo labels without its postprocessing.
    """
    from nnunet_proto.data.pseudo_labels import DEFAULT_DROP, Teacher, make_pseudo_labels

    if teacher_run is not None and not run_finished(teacher_run):
        raise RuntimeError(f"the teacher of this self-training run, plain nnU-Net in {teacher_run}, has not finished "
                           f"(training, evaluation and postprocessing). The benchmark runs plain first: run the same "
                           f"benchmark command again; it completes the plain run, then this one.")
    if teacher_run is not None:
        refuse_imported_teacher(teacher_run, "the self-training row", "the weights (as teacher)")
    checkpoint = "checkpoint_final.pth" if spec.checkpoint == "final" else "checkpoint_best.pth"
    teacher = Teacher(plain_trainer(spec), spec.plans, spec.configuration, fold, checkpoint, use_mirroring=True)
    t0 = perf_counter()
    summary = make_pseudo_labels(spec.dataset, teacher, 1, DEFAULT_DROP, device=str(device))
    return {"pseudo_label_wall_s": perf_counter() - t0, "pseudo_labels_predicted": summary["new"],
            "pseudo_labels": summary["cases"], "pseudo_label_teacher": teacher.describe(),
            "pseudo_label_postprocessing": [x["function"] for x in summary["postprocessing"]["steps"]]}


#: in a run folder: the warm start a run loaded (file and sha256), written when it is loaded, so that a run resumed
#: by a later process (a session ended mid-run) still reports it and the cost table still counts plain's training
WARM_START_FILE = "warm_start.json"


def recorded_warm_start(run_dir: Optional[Path]) -> Optional[dict]:
    """The warm start :func:`load_warm_start` recorded in ``run_dir``, or None."""
    f = run_dir / WARM_START_FILE if run_dir is not None else None
    return json.loads(f.read_text()) if f is not None and f.is_file() else None


def load_warm_start(trainer, plain_run: Path, run_dir: Optional[Path] = None) -> dict:
    """Load the finished plain run of the same fold into the warm-started trainer's student (every weight,
    after ``initialize()``; the trainer resets its teacher to it at train start) and record it in ``run_dir``
    (:data:`WARM_START_FILE`). Refuses an unfinished plain run."""
    from nnunet_proto.training.stage_switch import load_every_weight

    if not run_finished(plain_run):
        raise RuntimeError(f"{type(trainer).__name__} is warm-started from plain nnU-Net of the same fold, in "
                           f"{plain_run}, which has not finished. The benchmark runs plain first: run the same "
                           f"benchmark command again; it completes the plain run, then this one.")
    refuse_imported_teacher(plain_run, type(trainer).__name__, "the weights (warm start)")
    plain_fold = Path(json.loads((plain_run / "run_info.json").read_text())["output_folder"])
    record = load_every_weight(trainer, plain_fold / "checkpoint_final.pth")
    if run_dir is not None:
        write_json_atomic(run_dir / WARM_START_FILE, record)
    return record


def train(spec: BenchmarkSpec, trainer_name: str, fold: int, seed: int, device: torch.device,
          steps_factor: float = 1.0, plain_run: Optional[Path] = None, run_dir: Optional[Path] = None) -> dict:
    """Train (or resume) one run. ``plain_run``: the plain row's run folder of the same fold and seed, the warm
    start of a trainer that skips stage one (loaded only when the run starts, not when it resumes). ``run_dir``:
    the run folder, where the machine that trains is recorded before training starts."""
    from nnunet_proto.training.compat import get_trainer_from_args
    from nnunet_proto.training.stage_switch import WARM_START_ENV, warm_starts

    seed_everything(seed)
    os.environ[PRECISION_ENV] = spec.precision  # read by the semi-supervised trainers
    os.environ.pop(WARM_START_ENV, None)  # the benchmark's warm start is the plain run of the fold (below)
    if spec.precision == "bf16":
        trainer_name = BF16_PLAIN.get(trainer_name, trainer_name)
    trainer = get_trainer_from_args(spec.dataset, spec.configuration, fold, trainer_name, spec.plans,
                                    continue_training=True, device=device)
    trainer.num_epochs = int(round(spec.epochs * steps_factor))
    trainer.num_iterations_per_epoch = spec.iterations_per_epoch
    trainer.num_val_iterations_per_epoch = spec.val_iterations_per_epoch
    trainer.save_every = spec.save_every
    out = Path(trainer.output_folder)
    info = {"output_folder": str(out), "resumed_from_epoch": 0, "epochs_planned": trainer.num_epochs,
            "steps_factor": steps_factor}
    if (out / "checkpoint_final.pth").is_file():
        print(f"training already finished: {out / 'checkpoint_final.pth'}", flush=True)
    else:
        latest = out / "checkpoint_latest.pth"
        if latest.is_file():
            trainer.load_checkpoint(str(latest))
            info["resumed_from_epoch"] = trainer.current_epoch
            print(f"resuming {trainer_name} fold {fold} at epoch {trainer.current_epoch}", flush=True)
        elif warm_starts(trainer):
            if plain_run is None:
                raise RuntimeError(f"{trainer_name} skips stage one and needs the plain run of fold {fold} as its "
                                   f"warm start")
            info["warm_start_from"] = load_warm_start(trainer, plain_run, run_dir)
        if run_dir is not None:
            record_training_machine(run_dir, machine_name(device.type))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        reset_rss_high_water()
        t0 = perf_counter()
        trainer.run_training()
        info["train_wall_s_this_process"] = perf_counter() - t0
        info["peak_memory_mb"] = (torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda"
                                  else rss_high_water_mb())
        info["memory_kind"] = "CUDA max allocated" if device.type == "cuda" else "peak RSS of the training process"
    if "warm_start_from" not in info and (loaded := recorded_warm_start(run_dir)) is not None:
        info["warm_start_from"] = loaded  # resumed or finished: the process that started the run loaded it
    if spec.run_validation and not (out / "validation" / "summary.json").is_file():
        if not trainer.was_initialized:
            trainer.load_checkpoint(str(out / "checkpoint_final.pth"))
        trainer.perform_actual_validation(False)
    return info


def _checkpoint_name(spec: BenchmarkSpec) -> str:
    return "checkpoint_final.pth" if spec.checkpoint == "final" else "checkpoint_best.pth"


def predict(spec: BenchmarkSpec, fold: int, model_dir: Path, out: Path, device: torch.device,
            checkpoint: Optional[str] = None, cases: Optional[Dict[str, List[str]]] = None,
            mirroring: Optional[bool] = None, desc: str = "predicting test cases") -> None:
    """nnU-Net's predictor on the test images (or on ``cases``: {case: image files}) into ``out``; cases already
    predicted are skipped (an interrupted prediction resumes)."""
    from nnunet_proto.training.compat import load_json, nnUNetPredictor

    ending = load_json(str(model_dir / "dataset.json"))["file_ending"]
    if cases is None:
        names = sorted({p.name[: -len(ending) - 5] for p in Path(spec.test_images).glob(f"*_0000{ending}")})
        cases = {c: sorted(str(p) for p in Path(spec.test_images).glob(f"{c}_[0-9][0-9][0-9][0-9]{ending}"))
                 for c in names}
    todo = [c for c in sorted(cases) if not (out / f"{c}{ending}").is_file()]
    if not todo:
        return
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True,
                                use_mirroring=spec.test_time_mirroring if mirroring is None else mirroring,
                                device=device, verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=(fold,),
                                                   checkpoint_name=checkpoint or _checkpoint_name(spec))
    out.mkdir(parents=True, exist_ok=True)
    from nnunet_proto.benchmark.runner import folder_progress

    with folder_progress(out, f"*{ending}", len(todo), desc):
        predictor.predict_from_files([cases[c] for c in todo], [str(out / c) for c in todo], save_probabilities=False,
                                     overwrite=False, num_processes_preprocessing=1,
                                     num_processes_segmentation_export=1)


def postprocess(spec: BenchmarkSpec, val: Path, model_dir: Path, pred_dir: Path, out: Path, metrics_file: Path,
                require_summary: bool = True) -> dict:
    """Determine nnU-Net's postprocessing on the validation predictions in ``val``, apply it to ``pred_dir``.

    Every trainer is treated alike (the same nnU-Net function, its own validation cases). Returns the status
    (written to ``postprocessing.json`` / ``teacher.json`` by the caller): ``{"available": True, "steps":
    [{"function", "kwargs"}], "validation_dice_before", "validation_dice_after", "test_foreground_dice"}`` or
    ``{"available": False, "reason"}``. The post-processed test predictions go to ``out``, their metrics to
    ``metrics_file``.
    """
    from nnunet_proto.evaluation.metrics import evaluate_folders, write_results
    from nnunet_proto.training.compat import (
        apply_postprocessing_to_folder,
        determine_postprocessing,
        load_json,
        load_pickle,
        maybe_convert_to_dataset_name,
        nnUNet_preprocessed,
        require_env_path,
    )

    # nnU-Net's final validation writes summary.json; other validation predictions (the EMA teacher's) get theirs
    # from determine_postprocessing
    predicted = (val / "summary.json").is_file() or (not require_summary and val.is_dir() and any(
        val.glob("*" + load_json(str(model_dir / "dataset.json"))["file_ending"])))
    if not predicted:
        return {"available": False,
                "reason": f"no validation predictions in {val} (run with --no-validation): nnU-Net's postprocessing "
                          f"is determined on them, so post-processed numbers are missing for this run"}
    plans = load_json(str(model_dir / "plans.json"))
    dataset_json = load_json(str(model_dir / "dataset.json"))
    reference = Path(require_env_path(nnUNet_preprocessed)) / maybe_convert_to_dataset_name(spec.dataset) / \
        "gt_segmentations"
    if (val / "postprocessing.pkl").is_file() and (val / "postprocessing.json").is_file():
        fns, kwargs = load_pickle(str(val / "postprocessing.pkl"))  # determined by an earlier, interrupted process
    else:
        print(f"determining nnU-Net's postprocessing on the validation predictions in {val} (its warning that not "
              f"all reference files were found is expected: gt_segmentations holds every training case, the "
              f"fold's validation folder only its validation cases)", flush=True)
        fns, kwargs = determine_postprocessing(str(val), str(reference), plans, dataset_json, num_processes=1,
                                               keep_postprocessed_files=False)
    chosen = load_json(str(val / "postprocessing.json"))
    apply_postprocessing_to_folder(str(pred_dir), str(out), fns, kwargs, plans, dataset_json, num_processes=1)
    if (pred_dir / "dataset.json").is_file():  # labels and file ending for the evaluation, as in pred_dir
        shutil.copy(pred_dir / "dataset.json", out / "dataset.json")
    results = evaluate_folders(spec.test_labels, out, labels=list(spec.labels) if spec.labels else None)
    write_results(results, metrics_file)
    return {"available": True,
            "steps": [{"function": f.__name__, "kwargs": k} for f, k in zip(fns, kwargs)],
            "validation_dice_before": chosen["input_folder"]["foreground_mean"]["Dice"],
            "validation_dice_after": chosen["postprocessed"]["foreground_mean"]["Dice"],
            "test_foreground_dice": results["foreground_mean"]["Dice"]}


def evaluate_teacher(spec: BenchmarkSpec, fold: int, fold_dir: Path, model_dir: Path, run_dir: Path,
                     device: torch.device) -> dict:
    """The EMA teacher of a teacher-student run as its own row: predicted on the fold's validation cases (with
    mirroring, as nnU-Net's final validation of the student), its own postprocessing determined there, then the
    test cases raw and post-processed (``metrics_teacher.json``, ``metrics_teacher_postprocessed.json``)."""
    from nnunet_proto.evaluation.metrics import evaluate_folders, write_results
    from nnunet_proto.training.compat import (
        load_json,
        maybe_convert_to_dataset_name,
        nnUNet_preprocessed,
        nnUNet_raw,
        require_env_path,
    )
    from nnunet_proto.training.unlabeled import load_fold

    name = maybe_convert_to_dataset_name(spec.dataset)
    fold_dict = load_fold(str(Path(require_env_path(nnUNet_preprocessed)) / name / "splits_final.json"), fold) or {}
    ending = load_json(str(model_dir / "dataset.json"))["file_ending"]
    images = Path(require_env_path(nnUNet_raw)) / name / "imagesTr"
    val_cases = {c: sorted(str(p) for p in images.glob(f"{c}_[0-9][0-9][0-9][0-9]{ending}"))
                 for c in fold_dict.get("val", [])}
    val_dir = fold_dir / "validation_teacher"
    predict(spec, fold, model_dir, val_dir, device, TEACHER_CHECKPOINT, val_cases, mirroring=True,
            desc="teacher: validation cases")
    pred = run_dir / "test_predictions_teacher"
    predict(spec, fold, model_dir, pred, device, TEACHER_CHECKPOINT, desc="teacher: test cases")
    if not (run_dir / "metrics_teacher.json").is_file():
        write_results(evaluate_folders(spec.test_labels, pred, labels=list(spec.labels) if spec.labels else None),
                      run_dir / "metrics_teacher.json")
    status = postprocess(spec, val_dir, model_dir, pred, run_dir / "test_predictions_teacher_postprocessed",
                         run_dir / "metrics_teacher_postprocessed.json", require_summary=False) if val_cases else \
        {"available": False, "reason": f"fold {fold} has no validation cases"}
    if (val_dir / "summary.json").is_file():
        status["validation_foreground_dice"] = load_json(str(val_dir / "summary.json"))["foreground_mean"]["Dice"]
    status["checkpoint"] = str(fold_dir / TEACHER_CHECKPOINT)
    return status


def _num(x) -> str:
    return "undefined" if x is None or x != x else f"{x:.4f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--spec", required=True)
    p.add_argument("--trainer", required=True)
    p.add_argument("--fold", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--steps-factor", type=float, default=1.0)
    args = p.parse_args(argv)
    spec = BenchmarkSpec.from_json(Path(args.spec).read_text())
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(spec.device)
    previous = json.loads((run_dir / "run_info.json").read_text()) if (run_dir / "run_info.json").is_file() else {}

    labels = {}
    plain_run = run_dir.parent.parent / PLAIN / run_dir.name  # runs/<row>/labeled<A>_seed<S>: the plain run
    if is_self_training(args.trainer):  # the pseudo labels first (kept in the run folder: resumes skip them)
        record = run_dir / "pseudo_labels.json"
        if not record.is_file():
            print(f"pseudo-labeling the unlabeled pool with the plain run of fold {args.fold} (seed {args.seed})",
                  flush=True)
            record.write_text(json.dumps(pseudo_label(spec, args.fold, device, plain_run), indent=2, default=str))
        labels = json.loads(record.read_text())
    info = {**train(spec, args.trainer, args.fold, args.seed, device, args.steps_factor, plain_run, run_dir), **labels}
    machines = training_machines(run_dir)
    if machines is not None:  # runs trained before the record existed have none
        info["training_machines"] = machines
    fold_dir = Path(info["output_folder"])
    model_dir = fold_dir.parent
    ckpt = torch.load(fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    logging = ckpt["logging"]
    (run_dir / "curves.json").write_text(json.dumps(logging, default=float))
    secs = epoch_durations(logging)
    info.update(trainer=args.trainer, fold=args.fold, seed=args.seed, checkpoint=spec.checkpoint,
                epochs=len(secs), seconds_per_epoch_median=float(np.median(secs)) if secs else None,
                seconds_per_iteration_median=float(np.median(secs)) / spec.iterations_per_epoch if secs else None,
                torch_threads=torch.get_num_threads(), device=str(device), precision=spec.precision)
    for key in ("peak_memory_mb", "memory_kind", "train_wall_s_this_process", "warm_start_from"):
        if key not in info and key in previous:
            info[key] = previous[key]
    if (fold_dir / "validation" / "summary.json").is_file():
        summary = json.loads((fold_dir / "validation" / "summary.json").read_text())
        info["validation_foreground_dice"] = summary["foreground_mean"]["Dice"]
        # per-class validation Dice travels with the run's records (records.export_runs)
        shutil.copy(fold_dir / "validation" / "summary.json", run_dir / VALIDATION_SUMMARY)

    pred_dir = run_dir / "test_predictions"
    predict(spec, args.fold, model_dir, pred_dir, device)
    from nnunet_proto.evaluation.metrics import evaluate_folders, write_results

    if not (run_dir / "metrics.json").is_file():  # written only after every test case was predicted
        results = evaluate_folders(spec.test_labels, pred_dir, labels=list(spec.labels) if spec.labels else None)
        write_results(results, run_dir / "metrics.json")
    dice = json.loads((run_dir / "metrics.json").read_text())["foreground_mean"]["Dice"]
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=2, default=str))
    status = postprocess(spec, fold_dir / "validation", model_dir, pred_dir, run_dir / "test_predictions_postprocessed",
                         run_dir / "metrics_postprocessed.json")
    pp = (f", after postprocessing {_num(status['test_foreground_dice'])}" if status["available"]
          else " (no postprocessing: no validation predictions)")
    if (fold_dir / TEACHER_CHECKPOINT).is_file():  # before postprocessing.json: run_finished needs teacher.json
        teacher = evaluate_teacher(spec, args.fold, fold_dir, model_dir, run_dir, device)
        (run_dir / TEACHER_DONE_FILE).write_text(json.dumps(teacher, indent=2, default=str))
        dice_t = json.loads((run_dir / "metrics_teacher.json").read_text())["foreground_mean"]["Dice"]
        pp += f"; EMA teacher {_num(dice_t)}"
    (run_dir / "postprocessing.json").write_text(json.dumps(status, indent=2, default=str))  # last: run finished
    print(f"RUN DONE {args.trainer} fold {args.fold} seed {args.seed}: test foreground Dice {_num(dice)}{pp}",
          flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("nnUNet_compile", "f")
    sys.exit(main())

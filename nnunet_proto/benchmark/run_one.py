"""One benchmark run in its own process: train (or resume), validate, predict the test set, evaluate.

    python -m nnunet_proto.benchmark.run_one --spec SPEC.json --trainer T --fold F --seed S --run-dir DIR

Every stage is skipped when its output exists, so an interrupted run continues where it stopped:
training resumes from checkpoint_latest.pth (written every epoch), prediction from the cases already
written, and evaluation is cheap. Writes into DIR: ``metrics.json`` (+ CSV) from
``nnunet_proto evaluate``, ``run_info.json`` (seconds per epoch, peak memory, checkpoint used) and
``curves.json`` (every per-epoch value the trainer logged).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from time import perf_counter

import numpy as np
import torch

from nnunet_proto.benchmark.spec import PLAIN, BenchmarkSpec
from nnunet_proto.training.base_trainer import seed_everything
from nnunet_proto.training.precision import PRECISION_ENV

#: plain nnU-Net cannot read NNUNET_PROTO_CPU_PRECISION: its bf16 twin (trainers/nnUNetTrainerBaselines.py)
BF16_PLAIN = {PLAIN: "nnUNetTrainer_cpubf16"}


def _rss_peak_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _reset_rss_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def train(spec: BenchmarkSpec, trainer_name: str, fold: int, seed: int, device: torch.device) -> dict:
    from nnunet_proto.training.compat import get_trainer_from_args

    seed_everything(seed)
    os.environ[PRECISION_ENV] = spec.precision  # read by the semi-supervised trainers
    if spec.precision == "bf16":
        trainer_name = BF16_PLAIN.get(trainer_name, trainer_name)
    trainer = get_trainer_from_args(spec.dataset, spec.configuration, fold, trainer_name, spec.plans,
                                    continue_training=True, device=device)
    trainer.num_epochs = spec.epochs
    trainer.num_iterations_per_epoch = spec.iterations_per_epoch
    trainer.num_val_iterations_per_epoch = spec.val_iterations_per_epoch
    trainer.save_every = spec.save_every
    out = Path(trainer.output_folder)
    info = {"output_folder": str(out), "resumed_from_epoch": 0}
    if (out / "checkpoint_final.pth").is_file():
        print(f"training already finished: {out / 'checkpoint_final.pth'}", flush=True)
    else:
        latest = out / "checkpoint_latest.pth"
        if latest.is_file():
            trainer.load_checkpoint(str(latest))
            info["resumed_from_epoch"] = trainer.current_epoch
            print(f"resuming {trainer_name} fold {fold} at epoch {trainer.current_epoch}", flush=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _reset_rss_peak()
        t0 = perf_counter()
        trainer.run_training()
        info["train_wall_s_this_process"] = perf_counter() - t0
        info["peak_memory_mb"] = (torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda"
                                  else _rss_peak_mb())
        info["memory_kind"] = "CUDA max allocated" if device.type == "cuda" else "peak RSS of the training process"
    if spec.run_validation and not (out / "validation" / "summary.json").is_file():
        if not trainer.was_initialized:
            trainer.load_checkpoint(str(out / "checkpoint_final.pth"))
        trainer.perform_actual_validation(False)
    return info


def predict(spec: BenchmarkSpec, trainer_name: str, fold: int, model_dir: Path, out: Path,
            device: torch.device) -> None:
    from nnunet_proto.training.compat import load_json, nnUNetPredictor

    checkpoint = "checkpoint_final.pth" if spec.checkpoint == "final" else "checkpoint_best.pth"
    ending = load_json(str(model_dir / "dataset.json"))["file_ending"]
    cases = sorted({p.name[: -len(ending) - 5] for p in Path(spec.test_images).glob(f"*_0000{ending}")})
    todo = [c for c in cases if not (out / f"{c}{ending}").is_file()]
    if not todo:
        return
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=spec.test_time_mirroring,
                                device=device,
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=(fold,), checkpoint_name=checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    predictor.predict_from_files(spec.test_images, str(out), save_probabilities=False, overwrite=False,
                                 num_processes_preprocessing=1, num_processes_segmentation_export=1)


def epoch_seconds(logging: dict) -> list:
    return [e - s for s, e in zip(logging.get("epoch_start_timestamps", []), logging.get("epoch_end_timestamps", []))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--spec", required=True)
    p.add_argument("--trainer", required=True)
    p.add_argument("--fold", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--run-dir", required=True)
    args = p.parse_args(argv)
    spec = BenchmarkSpec.from_json(Path(args.spec).read_text())
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(spec.device)

    info = train(spec, args.trainer, args.fold, args.seed, device)
    fold_dir = Path(info["output_folder"])
    model_dir = fold_dir.parent
    ckpt = torch.load(fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    logging = ckpt["logging"]
    (run_dir / "curves.json").write_text(json.dumps(logging, default=float))
    previous = json.loads((run_dir / "run_info.json").read_text()) if (run_dir / "run_info.json").is_file() else {}
    secs = epoch_seconds(logging)
    info.update(trainer=args.trainer, fold=args.fold, seed=args.seed, checkpoint=spec.checkpoint,
                epochs=len(secs), seconds_per_epoch_median=float(np.median(secs)) if secs else None,
                seconds_per_iteration_median=float(np.median(secs)) / spec.iterations_per_epoch if secs else None,
                torch_threads=torch.get_num_threads(), device=str(device), precision=spec.precision)
    for key in ("peak_memory_mb", "memory_kind", "train_wall_s_this_process"):
        if key not in info and key in previous:
            info[key] = previous[key]
    if (fold_dir / "validation" / "summary.json").is_file():
        summary = json.loads((fold_dir / "validation" / "summary.json").read_text())
        info["validation_foreground_dice"] = summary["foreground_mean"]["Dice"]

    pred_dir = run_dir / "test_predictions"
    predict(spec, args.trainer, args.fold, model_dir, pred_dir, device)
    from nnunet_proto.evaluation.metrics import evaluate_folders, write_results

    results = evaluate_folders(spec.test_labels, pred_dir, labels=list(spec.labels) if spec.labels else None)
    write_results(results, run_dir / "metrics.json")
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=2, default=str))
    print(f"RUN DONE {args.trainer} fold {args.fold} seed {args.seed}: test foreground Dice "
          f"{results['foreground_mean']['Dice']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("nnUNet_compile", "f")
    sys.exit(main())

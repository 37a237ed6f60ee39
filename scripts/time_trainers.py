#!/usr/bin/env python
"""Time trainers side by side on the same plan: seconds per iteration, peak memory, data wait, overhead.

For every (configuration, trainer) a fresh subprocess builds the trainer exactly as nnUNetv2_train does,
starts its data loaders (background workers as configured by nnUNet_n_proc_DA), runs warm-up steps
and then ``--iterations`` timed steps. Semi-supervised trainers interleave each real step with an
"ideal" step that runs only the network passes the method needs (student forward+backward on the
patches the student sees, teacher forward on the unlabeled patches, optimizer step) with a trivial
loss: ``real / ideal - 1`` is the cost of the prototype maths, the method losses and the EMA update.
A second ideal, the one the core issue defines (student on labeled+unlabeled plus teacher forward),
is timed as well. Peak memory is the subprocess's peak RSS (CPU) or max allocated CUDA memory.

Usage (after plan/preprocess, preprocess-unlabeled, make-splits):
    python scripts/time_trainers.py -d 801 -p nnUNetPlans_tiny -f 5 -c 2d 3d_fullres -o timing.md
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path
from time import perf_counter

DEFAULT_TRAINERS = ["nnUNetTrainer", "nnUNetTrainerMeanTeacher", "nnUNetTrainerCPCL"]


class TimedIterator:
    def __init__(self, it):
        self.it, self.waited = it, 0.0

    def __next__(self):
        t0 = perf_counter()
        item = next(self.it)
        self.waited += perf_counter() - t0
        return item


def _loader_wait(trainer) -> float:
    return sum(getattr(dl, "waited", 0.0) for dl in (trainer.dataloader_train, getattr(trainer, "dataloader_unlabeled",
                                                                                          None)) if dl is not None)


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def ideal_step(trainer, data_l, target, data_u, student_on_unlabeled: bool) -> float:
    """Only the network passes (+ optimizer step) a semi-supervised step needs; returns seconds."""
    import torch

    from nnunet_proto.training.compat import unwrap_network

    _sync(trainer.device)
    t0 = perf_counter()
    trainer.optimizer.zero_grad(set_to_none=True)
    n = data_l.shape[0]
    x = torch.cat([data_l, data_u]) if student_on_unlabeled else data_l
    out = trainer.network(x)
    outs = out if isinstance(out, (list, tuple)) else [out]
    loss = trainer.loss([o[:n] for o in outs] if isinstance(out, (list, tuple)) else outs[0][:n], target)
    if student_on_unlabeled:
        loss = loss + 1e-3 * outs[0][n:].float().mean()
    if trainer.teacher is not None:
        with torch.no_grad():
            unwrap_network(trainer.teacher.module)(data_u)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainer.network.parameters(), 12)
    trainer.optimizer.step()
    _sync(trainer.device)
    for tap in list(trainer.student_taps.values()) + list(trainer.teacher_taps.values()):
        tap.clear()
    return perf_counter() - t0


def worker(args) -> dict:
    import torch

    from nnunet_proto.training.base_trainer import nnUNetTrainerSemiSupervised
    from nnunetv2.run.run_training import get_trainer_from_args

    torch.manual_seed(0)
    device = torch.device(args.device)
    trainer = get_trainer_from_args(str(args.dataset), args.configuration, args.fold, args.trainer, args.plans,
                                    device=device)
    trainer.num_epochs = 1000  # keeps the lr/ramp position of an ordinary run; no epoch ends here
    trainer.on_train_start()
    if not isinstance(trainer.dataloader_train, TimedIterator) and not hasattr(trainer.dataloader_train, "waited"):
        trainer.dataloader_train = TimedIterator(trainer.dataloader_train)
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    ssl = isinstance(trainer, nnUNetTrainerSemiSupervised)

    def real_step():
        _sync(device)
        t0 = perf_counter()
        w0 = _loader_wait(trainer)
        trainer.train_step(next(trainer.dataloader_train))
        _sync(device)
        return perf_counter() - t0, _loader_wait(trainer) - w0

    for _ in range(args.warmup):
        real_step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steps, waits, ideal, ideal_issue = [], [], [], []
    for _ in range(args.iterations):
        s, w = real_step()
        steps.append(s)
        waits.append(w)
        if ssl:
            batch = next(trainer.dataloader_train)
            data_u = next(trainer.dataloader_unlabeled)["data"].to(device)
            target = batch["target"]
            target = [t.to(device) for t in target] if isinstance(target, list) else target.to(device)
            data_l = batch["data"].to(device)
            ideal.append(ideal_step(trainer, data_l, target, data_u, trainer.method.student_sees_unlabeled))
            ideal_issue.append(ideal_step(trainer, data_l, target, data_u, True))
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    result = {"trainer": args.trainer, "configuration": args.configuration, "iterations": args.iterations,
              "s_per_it_median": statistics.median(steps), "s_per_it_mean": statistics.mean(steps),
              "data_wait_fraction": sum(waits) / sum(steps), "peak_memory_mb": peak / 2 ** 20,
              "memory_kind": "cuda max allocated" if device.type == "cuda" else "process peak RSS",
              "batch_size": trainer.batch_size,
              "unlabeled_batch_size": trainer.unlabeled_batch_size if ssl else 0,
              "patch_size": list(trainer.configuration_manager.patch_size)}
    if ssl:
        result["ideal_s_per_it_median"] = statistics.median(ideal)
        result["overhead_vs_ideal"] = statistics.median(steps) / statistics.median(ideal) - 1
        result["ideal_issue_s_per_it_median"] = statistics.median(ideal_issue)
        result["ratio_vs_issue_ideal"] = statistics.median(steps) / statistics.median(ideal_issue)
        result["student_sees_unlabeled"] = trainer.method.student_sees_unlabeled
    trainer.on_train_end = lambda: None  # do not write checkpoints or run validation
    from nnunet_proto.training.base_trainer import _finish

    for dl in (trainer.dataloader_train, getattr(trainer, "dataloader_unlabeled", None), trainer.dataloader_val):
        _finish(getattr(dl, "it", dl))
    return result


def report(results: list, args) -> str:
    lines = [f"# Trainer timing ({args.device}, dataset {args.dataset}, plans {args.plans}, fold {args.fold})", "",
             f"Command: `{' '.join(sys.argv)}`", "",
             f"{args.iterations} timed iterations after {args.warmup} warm-up iterations, each trainer in its own "
             f"process; nnUNet_n_proc_DA={os.environ.get('nnUNet_n_proc_DA', '(nnU-Net default)')}. "
             "Ratios compare trainers measured in this run on the same machine.", "",
             "| config | trainer | batch (l+u) | s/it (median) | vs plain | data wait | peak memory MB | "
             "extra work vs own passes | vs issue ideal |", "|---|---|---|---|---|---|---|---|---|"]
    plain = {r["configuration"]: r["s_per_it_median"] for r in results if r["trainer"] == "nnUNetTrainer"}
    for r in results:
        base = plain.get(r["configuration"])
        lines.append(
            f"| {r['configuration']} | {r['trainer']} | {r['batch_size']}+{r['unlabeled_batch_size']} | "
            f"{r['s_per_it_median']:.3f} | {r['s_per_it_median'] / base:.2f}x | "
            f"{100 * r['data_wait_fraction']:.1f}% | {r['peak_memory_mb']:.0f} | "
            + (f"{100 * r['overhead_vs_ideal']:+.1f}% | {r['ratio_vs_issue_ideal']:.2f}x |" if "overhead_vs_ideal" in r
               else "- | - |"))
    lines += ["", "* *extra work vs own passes*: real step time over the time of the same network passes with a "
                  "trivial loss (student forward+backward on the patches the method feeds it, teacher forward on the "
                  "unlabeled patches, optimizer step) minus 1: the cost of prototype maths, method losses and EMA.",
              "* *vs issue ideal*: real step over student forward+backward on labeled+unlabeled plus teacher "
              "forward. CPCL's student sees labeled patches only (paper path), so it can be below 1.",
              "* *data wait*: share of the step time spent waiting for the labeled and unlabeled batches."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--dataset", required=True)
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("-f", "--fold", type=int, required=True)
    p.add_argument("-c", "--configurations", nargs="+", default=["2d"])
    p.add_argument("-tr", "--trainers", nargs="+", default=DEFAULT_TRAINERS)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("-o", "--output", help="markdown report (a .json with the raw numbers is written beside it)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--trainer", help=argparse.SUPPRESS)
    p.add_argument("--configuration", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return 0
    results = []
    for configuration in args.configurations:
        for trainer in args.trainers:
            cmd = [sys.executable, __file__, "--worker", "-d", str(args.dataset), "-p", args.plans, "-f", str(args.fold),
                   "--trainer", trainer, "--configuration", configuration, "--iterations", str(args.iterations),
                   "--warmup", str(args.warmup), "--device", args.device]
            print(f"timing {trainer} {configuration} ...", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                raise RuntimeError(f"timing {trainer} {configuration} failed")
            results.append(json.loads(lines[-1][7:]))
    text = report(results, args)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
        Path(args.output).with_suffix(".json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

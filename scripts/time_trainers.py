#!/usr/bin/env python
"""Time trainers side by side on the same plan: seconds per iteration, overhead, data wait, peak memory.

Two measurements per configuration:

1. Compute (one process, all trainers interleaved round-robin): each trainer is built exactly as
   nnUNetv2_train builds it, a few labeled and unlabeled batches are fetched up front, and the timed
   steps cycle through those cached batches with no background workers running, so that no data
   augmentation competes for the CPU and a change of machine load hits all trainers alike. Each
   semi-supervised step is paired with "ideal" steps that run only the network passes:
     * own passes: student forward+backward on the patches the method feeds the student, teacher
       forward on the unlabeled patches, gradient clipping and optimizer step, with a trivial loss;
       ``real / own - 1`` is the cost of prototype maths, method losses and the EMA update;
     * issue ideal: student forward+backward on labeled+unlabeled plus teacher forward (the core
       issue's definition).
2. Data wait and memory (one fresh process per trainer, real data loaders with nnU-Net's background
   workers as set by nnUNet_n_proc_DA): the share of the step time spent waiting for batches, and the
   peak resident memory during training (the kernel's high-water mark is reset after start-up via
   /proc/self/clear_refs, so imports and set-up do not count) or max allocated CUDA memory.

``--precisions fp32 bf16`` repeats everything under CPU bfloat16 autocast (NNUNET_PROTO_CPU_PRECISION=bf16 for
the semi-supervised trainers, nnUNetTrainer_cpubf16 for plain nnU-Net) and reports the speed-up per trainer.

Usage (after plan/preprocess, preprocess-unlabeled, make-splits):
    python scripts/time_trainers.py -d 801 -p nnUNetPlans_tiny -f 5 -c 2d 3d_fullres -o timing.md
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from time import perf_counter

DEFAULT_TRAINERS = ["nnUNetTrainer", "nnUNetTrainerMeanTeacher", "nnUNetTrainerCPCL"]


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def build(name: str, args, configuration: str):
    """A trainer built and started exactly as nnUNetv2_train does (lookup via nnUNet_extTrainer)."""
    import torch

    from nnunet_proto.training.compat import get_trainer_from_args
    from nnunet_proto.training.precision import cpu_precision

    if name == "nnUNetTrainer" and cpu_precision() == "bf16":
        name = "nnUNetTrainer_cpubf16"  # plain nnU-Net cannot read NNUNET_PROTO_CPU_PRECISION

    torch.manual_seed(0)
    trainer = get_trainer_from_args(str(args.dataset), configuration, args.fold, name, args.plans,
                                    device=torch.device(args.device))
    trainer.num_epochs = 1000  # lr/ramp positions of an ordinary run; no epoch ends during timing
    trainer.on_train_start()
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    if hasattr(trainer, "enter_last_stage"):
        trainer.enter_last_stage()  # staged methods (BCP) are timed in their main, last stage
    if getattr(trainer.method if hasattr(trainer, "method") else None, "stage", None) == 1 and \
            hasattr(trainer, "start_self_training"):
        trainer.start_self_training()  # two-stage methods (MPER) are timed in their main, second stage
    return trainer


def is_ssl(trainer) -> bool:
    from nnunet_proto.training.base_trainer import nnUNetTrainerSemiSupervised

    return isinstance(trainer, nnUNetTrainerSemiSupervised)


def _raw(loader):
    """The batch iterator under a timing wrapper (if any)."""
    return getattr(loader, "loader", loader)


def shutdown(trainer) -> None:
    from nnunet_proto.training.base_trainer import _finish

    for dl in (trainer.dataloader_train, getattr(trainer, "dataloader_unlabeled", None), trainer.dataloader_val):
        _finish(_raw(dl))


def ideal_step(trainer, batch: dict, data_u, student_on_unlabeled: bool) -> float:
    """Only the network passes (+ clipping and optimizer step) a semi-supervised step needs; seconds."""
    import torch

    from nnunet_proto.training.precision import cpu_precision, step_autocast

    device = trainer.device
    data_l = batch["data"].to(device)
    target = batch["target"]
    target = [t.to(device) for t in target] if isinstance(target, list) else target.to(device)
    data_u = data_u.to(device)
    _sync(device)
    t0 = perf_counter()
    trainer.optimizer.zero_grad(set_to_none=True)
    n = data_l.shape[0]
    x = torch.cat([data_l, data_u]) if student_on_unlabeled else data_l
    with step_autocast(device, cpu_precision()):  # the same precision as the real step it is compared with
        out = trainer.network(x)
        outs = out if isinstance(out, (list, tuple)) else [out]
        loss = trainer.loss([o[:n] for o in outs] if isinstance(out, (list, tuple)) else outs[0][:n], target)
        if student_on_unlabeled:
            loss = loss + 1e-3 * outs[0][n:].float().mean()
        if trainer.teacher is not None:
            with torch.no_grad():
                trainer.teacher.module(data_u)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainer.network.parameters(), 12)
    trainer.optimizer.step()
    _sync(device)
    for tap in list(trainer.student_taps.values()) + list(trainer.teacher_taps.values()):
        tap.clear()
    return perf_counter() - t0


class ComputeTimer:
    """A started trainer that steps on cached batches (no data loading inside the timed region)."""

    def __init__(self, name: str, args, configuration: str, cache: int = 4):
        self.trainer = t = build(name, args, configuration)
        self.ssl = is_ssl(t)
        self.labeled = [next(t.dataloader_train) for _ in range(cache)]
        self.unlabeled = [next(t.dataloader_unlabeled) for _ in range(cache)] if self.ssl else []
        shutdown(t)  # no background workers while timing
        if self.ssl:
            t.dataloader_unlabeled = itertools.cycle(self.unlabeled)
        self._labeled = itertools.cycle(self.labeled)
        self.steps, self.own, self.issue = [], [], []

    def step(self, record: bool = True) -> None:
        t = self.trainer
        batch = next(self._labeled)
        _sync(t.device)
        t0 = perf_counter()
        t.train_step(batch)
        _sync(t.device)
        if not record:
            return
        self.steps.append(perf_counter() - t0)
        if self.ssl:
            data_u = self.unlabeled[len(self.steps) % len(self.unlabeled)]["data"]
            self.own.append(ideal_step(t, batch, data_u, t.method.student_sees_unlabeled))
            self.issue.append(ideal_step(t, batch, data_u, True))

    def result(self, configuration: str) -> dict:
        t = self.trainer
        med = statistics.median(self.steps)
        from nnunet_proto.training.precision import cpu_precision

        name = "nnUNetTrainer" if type(t).__name__ == "nnUNetTrainer_cpubf16" else type(t).__name__
        r = {"trainer": name, "configuration": configuration, "precision": cpu_precision(),
             "iterations": len(self.steps),
             "s_per_it_median": med, "s_per_it_mean": statistics.mean(self.steps), "batch_size": t.batch_size,
             "unlabeled_batch_size": t.unlabeled_batch_size if self.ssl else 0,
             "patch_size": list(t.configuration_manager.patch_size)}
        if self.ssl:
            r.update(own_passes_s_per_it=statistics.median(self.own),
                     overhead_vs_own_passes=med / statistics.median(self.own) - 1,
                     issue_ideal_s_per_it=statistics.median(self.issue),
                     ratio_vs_issue_ideal=med / statistics.median(self.issue),
                     student_sees_unlabeled=t.method.student_sees_unlabeled)
        return r


def time_compute(args, configuration: str) -> list:
    os.environ["nnUNet_n_proc_DA"] = "0"  # batches come from the cache; start no workers at all
    timers = [ComputeTimer(name, args, configuration) for name in args.trainers]
    for _ in range(args.warmup):
        for timer in timers:
            timer.step(record=False)
    for _ in range(args.iterations):
        for timer in timers:
            timer.step()
    return [timer.result(configuration) for timer in timers]


def loader_worker(args) -> dict:
    """Data wait and peak memory of one trainer stepping alone with its real data loaders."""
    import torch

    from nnunet_proto.training.base_trainer import TimedLoader

    trainer = build(args.trainer, args, args.configuration)
    device = trainer.device
    if not hasattr(trainer.dataloader_train, "waited"):
        trainer.dataloader_train = TimedLoader(trainer.dataloader_train)
    loaders = [trainer.dataloader_train] + ([trainer.dataloader_unlabeled] if is_ssl(trainer) else [])
    for _ in range(args.warmup):
        trainer.train_step(next(trainer.dataloader_train))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    from nnunet_proto.resources import reset_rss_high_water, rss_high_water_mb

    reset = reset_rss_high_water()
    waited0 = sum(dl.waited for dl in loaders)
    _sync(device)
    t0 = perf_counter()
    for _ in range(args.iterations):
        trainer.train_step(next(trainer.dataloader_train))
    _sync(device)
    total = perf_counter() - t0
    wait = sum(dl.waited for dl in loaders) - waited0
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated() / 2 ** 20, "CUDA max allocated"
    else:
        peak, kind = rss_high_water_mb(), "peak RSS during training" if reset else "peak RSS of the process"
    shutdown(trainer)
    return {"data_wait_fraction": wait / total, "loader_s_per_it": total / args.iterations,
            "peak_memory_mb": peak, "memory_kind": kind,
            "workers": os.environ.get("nnUNet_n_proc_DA", "nnU-Net default")}


def report(results: list, args) -> str:
    kind = results[0].get("memory_kind", "") if results else ""
    lines = [f"# Trainer timing ({args.device}, dataset {args.dataset}, plans {args.plans}, fold {args.fold})", "",
             f"Command: `python {' '.join(sys.argv)}`", "",
             f"Compute: {args.iterations} timed steps per trainer after {args.warmup} warm-up steps, trainers "
             f"interleaved in one process on cached batches, no augmentation workers running. Data wait and memory: "
             f"each trainer alone in a fresh process with its real loaders (nnUNet_n_proc_DA="
             f"{results[0].get('workers') if results else '?'}), {args.iterations} steps. Compare ratios within this "
             f"run, not absolute times across machines.", "",
             f"| config | precision | trainer | batch (l+u) | s/it | vs plain | bf16 speed-up | extra work vs own "
             f"passes | vs issue ideal | data wait | {kind} MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    plain = {(r["configuration"], r["precision"]): r["s_per_it_median"] for r in results
             if r["trainer"] == "nnUNetTrainer"}
    fp32 = {(r["configuration"], r["trainer"]): r["s_per_it_median"] for r in results if r["precision"] == "fp32"}
    for r in results:
        base = plain.get((r["configuration"], r["precision"]))
        ref = fp32.get((r["configuration"], r["trainer"]))
        speed = f"{ref / r['s_per_it_median']:.2f}x" if (ref and r["precision"] != "fp32") else "-"
        rel = f"{r['s_per_it_median'] / base:.2f}x" if base else "-"
        extra = (f"{100 * r['overhead_vs_own_passes']:+.1f}% | {r['ratio_vs_issue_ideal']:.2f}x"
                 if "overhead_vs_own_passes" in r else "- | -")
        lines.append(f"| {r['configuration']} | {r['precision']} | {r['trainer']} | "
                     f"{r['batch_size']}+{r['unlabeled_batch_size']} | {r['s_per_it_median']:.3f} | {rel} | {speed} | "
                     f"{extra} | {100 * r['data_wait_fraction']:.1f}% | "
                     f"{r['peak_memory_mb']:.0f} |")
    lines += ["", "* s/it: median seconds per training step (compute only).",
              "* extra work vs own passes: real step over the same network passes with a trivial loss (student "
              "forward+backward on the patches the method feeds it, teacher forward on the unlabeled patches, "
              "clipping, optimizer step), minus 1: the cost of prototype maths, method losses and the EMA update.",
              "* vs issue ideal: real step over student forward+backward on labeled+unlabeled plus teacher forward. "
              "A method whose student sees only labeled patches (CPCL's paper path) can come out below 1.",
              "* data wait: share of the step time spent waiting for labeled and unlabeled batches with real "
              "background loaders.",
              "* two-stage methods (MPER) are timed in stage two; their stage one costs about a plain step. MPER's "
              "student sees the copy-paste mixed patches instead of the raw ones, so its own passes differ from "
              "the ideal measured here (the teacher forward on unlabeled patches is the same)."]
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
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32"],
                   help="CPU training precisions to time (bf16 = bfloat16 autocast, opt-in)")
    p.add_argument("-o", "--output", help="markdown report (the raw numbers go to a .json beside it)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--trainer", help=argparse.SUPPRESS)
    p.add_argument("--configuration", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(loader_worker(args)))
        return 0
    from nnunet_proto.training.precision import PRECISION_ENV

    base_env = dict(os.environ)  # before time_compute sets nnUNet_n_proc_DA=0 for itself
    results = []
    for configuration, precision in itertools.product(args.configurations, args.precisions):
        os.environ[PRECISION_ENV] = precision
        user_env = {**base_env, PRECISION_ENV: precision}
        print(f"compute timing of {args.trainers} on {configuration} ({precision}) ...", file=sys.stderr, flush=True)
        config_results = time_compute(args, configuration)
        for r in config_results:
            print(f"data wait and memory of {r['trainer']} on {configuration} ...", file=sys.stderr, flush=True)
            cmd = [sys.executable, __file__, "--worker", "-d", str(args.dataset), "-p", args.plans,
                   "-f", str(args.fold), "--trainer", r["trainer"], "--configuration", configuration,
                   "--iterations", str(args.iterations), "--warmup", str(args.warmup), "--device", args.device]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=user_env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                raise RuntimeError(f"loader run of {r['trainer']} on {configuration} failed")
            r.update(json.loads(lines[-1][7:]))
        results += config_results
    text = report(results, args)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
        Path(args.output).with_suffix(".json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

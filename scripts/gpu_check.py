#!/usr/bin/env python
"""One-command check of every trainer on a CUDA GPU (run through scripts/gpu_check.sh).

1. makes a synthetic 3D dataset (labeled, unlabeled and test images) and plans it with nnU-Net's default
   planner (3d_fullres, the real plan; ``--tiny``: the tests' tiny plan patch instead);
2. runs plain nnU-Net and every semi-supervised trainer in trainers/ for a fixed number of steps with
   nnU-Net's AMP (fp16 autocast + GradScaler on CUDA), with torch.compile on and off, each run in a fresh
   process: seconds per step (median after warm-up), compile time (first steps minus steady state), peak
   ``torch.cuda.max_memory_allocated`` (CPU: peak RSS growth during the steps), whether every logged loss
   term is finite;
3. predicts the test images through ``nnUNetv2_predict`` with the checkpoint and with the teacher export;
4. with 2+ GPUs: ``nnUNetv2_train ... -num_gpus 2`` for CPCL, checking that both ranks saw the same prototypes;
5. prints the table and writes it as ``gpu_check.json`` and ``gpu_check.md`` into the output folder.

Runs that would exceed ``--budget-min`` are skipped and marked so; the report is always written.
``--device cpu --tiny`` exercises all of it on CPU (CI); nnU-Net never compiles on CPU, so there the compile-on
runs are skipped unless ``--cpu-compile`` lifts nnU-Net's refusal (3D only).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from time import perf_counter

REPO = Path(__file__).resolve().parent.parent
DATASET_ID = 990
PLAIN = "nnUNetTrainer"
PROTO_HASH_FILE = "prototypes_rank{rank}.json"


def log(msg: str) -> None:
    print(f"[gpu_check {perf_counter() - T0:6.0f}s] {msg}", flush=True)


T0 = perf_counter()


def semi_supervised_trainers() -> list:
    """Every top-level semi-supervised trainer class in trainers/ (schedule and precision variants excluded)."""
    from nnunet_proto.training.discovery import semi_supervised_trainer_names

    return semi_supervised_trainer_names(REPO / "trainers", module_prefix="_gpu_check_")


# ----------------------------------------------------------------------------------------------- dataset
def prepare_dataset(args, work: Path) -> dict:
    from nnunet_proto.cli import main as cli

    def run(*argv):
        code = cli([str(a) for a in argv])
        if code != 0:
            raise RuntimeError(f"nnunet_proto {' '.join(map(str, argv))} failed with exit code {code}")

    name = f"Dataset{DATASET_ID:03d}_Synthetic"
    pre = work / "preprocessed" / name
    plans = "nnUNetPlans_tiny" if args.tiny else "nnUNetPlans"
    done = pre / "gpu_check_fold.txt"
    shape = args.shape or ([4, 40, 40] if args.tiny else [96, 160, 160])
    made_with = {"tiny": bool(args.tiny), "shape": [int(v) for v in shape], "labeled": args.labeled,
                 "unlabeled": args.unlabeled}
    recorded = pre / "gpu_check_dataset.json"
    if done.is_file():
        before = json.loads(recorded.read_text()) if recorded.is_file() else None
        if before != made_with:
            raise SystemExit(f"gpu_check: the dataset in {work} was made with {before or 'unrecorded settings'}, this "
                             f"run asks for {made_with}. Use another OUT_DIR, or delete {work} to rebuild it.")
        if not (pre / f"nnUNetPlans_{args.configuration}").is_dir():  # another configuration of the same dataset
            from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess

            preprocess([DATASET_ID], configurations=(args.configuration,), num_processes=[args.processes],
                       verbose=False)
            run("preprocess-unlabeled", "-d", DATASET_ID, "-c", args.configuration, "-p", plans)
        return {"plans": plans, "fold": int(done.read_text()), "name": name}
    log(f"synthetic dataset {name}: {args.labeled} labeled, {args.unlabeled} unlabeled, 2 test, shape {shape}")
    run("synthetic", "-d", DATASET_ID, "--labeled", args.labeled, "--unlabeled", args.unlabeled, "--test", 2,
        "--shape", *shape, "--seed", 0)
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    log(f"nnU-Net fingerprint, default planner, preprocessing ({args.configuration})")
    extract_fingerprints([DATASET_ID], num_processes=args.processes, check_dataset_integrity=True, verbose=False,
                         show_progress_bar=False)
    n_proc_da = os.environ.pop("nnUNet_n_proc_DA", None)  # nnU-Net's planner calls set_num_threads(n_proc_DA): 0 fails
    try:
        plan_experiments([DATASET_ID])
    finally:
        if n_proc_da is not None:
            os.environ["nnUNet_n_proc_DA"] = n_proc_da
    preprocess([DATASET_ID], configurations=(args.configuration,), num_processes=[args.processes], verbose=False)
    if args.tiny:
        run("plans-patch", "-d", DATASET_ID, REPO / "plans" / "synthetic_tiny.json")
    run("preprocess-unlabeled", "-d", DATASET_ID, "-c", args.configuration, "-p", plans)
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        run("make-splits", "-d", DATASET_ID, "--labeled", max(2, args.labeled // 2), "--seed", 0)
    fold = int(buf.getvalue().strip().splitlines()[-1])
    recorded.write_text(json.dumps(made_with))
    done.write_text(str(fold))
    return {"plans": plans, "fold": fold, "name": name}


# ----------------------------------------------------------------------------------------------- one run
def worker(args) -> dict:
    """One trainer, one compile setting, in this (fresh) process: steps, timing, memory, checkpoints."""
    import numpy as np
    import torch

    from nnunet_proto.training.compat import get_trainer_from_args, is_compiled, nnUNetTrainer

    device = torch.device(args.device)
    args.compile = args.compile[0] if isinstance(args.compile, list) else args.compile
    if args.compile == "on" and device.type == "cpu":  # nnU-Net refuses CPU compile; lifted for 3D on request
        nnUNetTrainer._do_i_compile = lambda self: True
    os.environ["nnUNet_compile"] = "t" if args.compile == "on" else "f"
    torch.manual_seed(0)
    trainer = get_trainer_from_args(str(DATASET_ID), args.configuration, args.fold, args.trainer, args.plans,
                                    device=device)
    trainer.num_epochs, trainer.num_iterations_per_epoch = 1, args.steps
    trainer.num_val_iterations_per_epoch = 1
    trainer.on_train_start()
    compiled = is_compiled(trainer.network)
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    from nnunet_proto.resources import reset_rss_high_water, rss_high_water_mb, rss_mb

    rss0 = rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    reset_rss_high_water()
    times, outputs = [], []
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = perf_counter()
        outputs.append(trainer.train_step(next(trainer.dataloader_train)))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(perf_counter() - t0)
    profiled_peak = _profiled_step_peak_mb(trainer, outputs) if device.type == "cpu" else None
    warm = min(args.warmup, len(times) - 1)
    steady = statistics.median(times[warm:])
    if device.type == "cuda":
        peak, kind = (torch.cuda.max_memory_allocated() - base_alloc) / 2 ** 20, "CUDA max allocated growth"
    else:
        peak, kind = rss_high_water_mb() - rss0, "peak RSS growth"
    if profiled_peak is not None:  # the allocator-level peak of one more step (RSS reuses freed heap memory)
        peak, kind = profiled_peak, "peak tensor memory of one step (torch.profiler memory timeline)"
    values = {k: float(np.mean([float(o[k]) for o in outputs])) for k in outputs[0]}
    finite = all(math.isfinite(float(o[k])) for o in outputs for k in o)
    trainer.on_train_epoch_end(outputs)
    trainer.current_epoch += 1
    trainer.on_train_end()  # writes checkpoint_final.pth (+ checkpoint_final_teacher.pth)
    out = Path(trainer.output_folder)
    result = {"trainer": args.trainer, "compile": args.compile, "compiled": compiled, "steps": args.steps,
              "s_per_step": steady, "first_steps_s": times[:warm], "compile_s": sum(times[:warm]) - warm * steady,
              "peak_memory_mb": peak, "memory_kind": kind, "finite_terms": finite, "mean_terms": values,
              "batch_size": trainer.batch_size,
              "unlabeled_batch_size": getattr(trainer, "unlabeled_batch_size", 0),
              "patch_size": list(trainer.configuration_manager.patch_size), "output_folder": str(out),
              "teacher_export": (out / "checkpoint_final_teacher.pth").is_file()}
    ckpt = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    result["orig_mod_keys"] = sum("_orig_mod" in k for k in ckpt["network_weights"])
    return result


def _profiled_step_peak_mb(trainer, outputs: list) -> float:
    """Peak of live tensor memory (parameters excluded: only what the step allocates) during one more training
    step, from torch.profiler's memory timeline: the CPU counterpart of CUDA's max_memory_allocated growth."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        outputs.append(trainer.train_step(next(trainer.dataloader_train)))
    with tempfile.TemporaryDirectory() as tmp:
        import warnings

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                prof.export_memory_timeline(f"{tmp}/timeline.json", device="cpu")
        except Exception as exc:  # torch's memory-profile analysis does not handle every op graph
            print(f"torch.profiler memory timeline failed ({type(exc).__name__}: {exc}); falling back to RSS",
                  flush=True)
            return None
        _, sizes = json.loads(Path(f"{tmp}/timeline.json").read_text())
    return max(sum(s) for s in sizes) / 2 ** 20 if sizes else float("nan")


def run_capped(cmd: list, env: dict, timeout: float | None) -> subprocess.CompletedProcess:
    """subprocess.run capturing text output; a run past ``timeout`` comes back as exit code 124 with a note
    instead of raising, so one hung trainer becomes an error row and the report is still written."""
    try:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        return subprocess.CompletedProcess(cmd, 124, text(e.stdout),
                                           text(e.stderr) + f"\ntimed out after {timeout} s (--run-timeout)")


def predict(args, env: dict, trainer: str, ds: dict, checkpoint: str, out: Path) -> bool:
    """nnUNetv2_predict (its own entry point, in a subprocess) on the test images; True if every case came back."""
    raw = Path(env["nnUNet_raw"]) / ds["name"]
    shutil.rmtree(out, ignore_errors=True)
    argv = ["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID), "-c",
            args.configuration, "-f", str(ds["fold"]), "-tr", trainer, "-p", ds["plans"], "-chk", checkpoint,
            "-device", args.device, "--disable_tta", "-npp", "1", "-nps", "1"]
    code = ("import sys; from nnunetv2.inference.predict_from_raw_data import predict_entry_point; "
            f"sys.argv = {argv!r}; predict_entry_point()")
    proc = run_capped([sys.executable, "-c", code], env, args.run_timeout)
    cases = sorted(raw.joinpath("imagesTs").glob("*_0000.nii.gz"))
    ok = proc.returncode == 0 and all((out / c.name.replace("_0000.nii.gz", ".nii.gz")).is_file() for c in cases)
    if not ok:
        log(f"nnUNetv2_predict {trainer} -chk {checkpoint} failed:\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}")
    return ok


def run_one(args, env: dict, trainer: str, ds: dict, compile_on: str, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--device", args.device, "--trainer", trainer, "--compile",
           compile_on, "--fold", str(ds["fold"]), "--plans", ds["plans"], "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--configuration", args.configuration, str(work.parent)]
    proc = run_capped(cmd, env, args.run_timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout[-2000:] + "\n" + proc.stderr[-3000:]).strip()
        log(f"{trainer} compile {compile_on} FAILED:\n{tail}")
        return {"trainer": trainer, "compile": compile_on, "error": tail.splitlines()[-1] if tail else "failed"}
    result = json.loads(lines[-1][7:])
    if args.no_predict:
        result["predict_checkpoint"], result["predict_teacher"] = "not run", "not run"
        return result
    preds = work / "predictions" / f"{trainer}_compile_{compile_on}"
    result["predict_checkpoint"] = predict(args, env, trainer, ds, "checkpoint_final.pth", preds / "student")
    result["predict_teacher"] = (predict(args, env, trainer, ds, "checkpoint_final_teacher.pth", preds / "teacher")
                                 if result["teacher_export"] else None)
    return result


# ----------------------------------------------------------------------------------------------- DDP
DDP_TRAINER_FILE = '''"""gpu_check: CPCL that records a checksum of every prototype set it computes, per DDP rank."""
import json
import os

import torch

import nnunet_proto.methods.cpcl as cpcl
from nnunet_proto.training.variants import schedule_variant
from nnUNetTrainerCPCL import nnUNetTrainerCPCL

_seen = []
_original = cpcl.masked_average_pooling


def _recording(*args, **kwargs):
    protos = _original(*args, **kwargs)
    _seen.append([round(float(protos.vectors.double().sum()), 4), int(protos.valid.sum())])
    return protos


cpcl.masked_average_pooling = _recording


class nnUNetTrainerCPCL_ddpcheck(schedule_variant(nnUNetTrainerCPCL, "gpucheck", 1, 4, 1)):
    def on_train_end(self):
        super().on_train_end()
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        with open(os.path.join(self.output_folder, "prototypes_rank%d.json" % rank), "w") as f:
            json.dump(_seen, f)
'''


def ddp_check(args, env: dict, ds: dict, work: Path) -> dict:
    folder = work / "ddp_trainers"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "nnUNetTrainerCPCL_ddpcheck.py").write_text(DDP_TRAINER_FILE)
    env = dict(env, nnUNet_extTrainer=os.pathsep.join([str(folder), str(REPO / "trainers")]),
               PYTHONPATH=os.pathsep.join([str(REPO / "trainers"), env.get("PYTHONPATH", "")]))
    argv = ["nnUNetv2_train", str(DATASET_ID), args.configuration, str(ds["fold"]), "-tr", "nnUNetTrainerCPCL_ddpcheck",
            "-p", ds["plans"], "-num_gpus", "2", "--npz"]
    code = ("import sys; from nnunetv2.run.run_training import run_training_entry; "
            f"sys.argv = {argv!r}; run_training_entry()")
    proc = run_capped([sys.executable, "-c", code], env, args.run_timeout)
    results = Path(env["nnUNet_results"]) / ds["name"]
    files = sorted(results.glob(f"nnUNetTrainerCPCL_ddpcheck__{ds['plans']}__{args.configuration}/fold_{ds['fold']}/"
                                "prototypes_rank*.json"))
    seen = [json.loads(f.read_text()) for f in files]
    same = len(seen) == 2 and seen[0] == seen[1] and len(seen[0]) > 0
    out = {"returncode": proc.returncode, "ranks": len(seen), "prototype_sets": len(seen[0]) if seen else 0,
           "same_prototypes": same}
    if proc.returncode != 0:
        out["error"] = (proc.stdout[-1500:] + proc.stderr[-1500:]).strip().splitlines()[-1:]
    return out


# ----------------------------------------------------------------------------------------------- report
def table(results: list, meta: dict) -> str:
    lines = [f"# gpu_check: {meta['device_name']}", "",
             f"torch {meta['torch']}, nnU-Net {meta['nnunet']}, {meta['gpus']} GPU(s). Plan `{meta['plans']}` "
             f"{meta['configuration']}, patch {meta.get('patch')}, labeled batch {meta.get('batch')} (unlabeled: the "
             f"trainers' default, the same); "
             f"{meta['steps']} steps per run ({meta['warmup']} warm-up steps excluded from s/step; compile time = "
             f"warm-up time minus warm-up steps at steady speed). AMP: {meta['amp']}. Memory: {meta['memory_kind']}. "
             f"Total wall time {meta['wall_s']:.0f} s.", "",
             "| trainer | compile | s/step | vs plain | compile s | peak MB | vs plain | finite terms | predict ckpt "
             "| predict teacher |", "|---|---|---|---|---|---|---|---|---|---|"]
    plain = {r["compile"]: r for r in results if r["trainer"] == PLAIN and "s_per_step" in r}
    for r in results:
        if "s_per_step" not in r:
            lines.append(f"| {r['trainer']} | {r['compile']} | {r.get('skipped') or 'FAILED: ' + r.get('error', '')} "
                         f"| | | | | | | |")
            continue
        p = plain.get(r["compile"])
        rel_t = f"{r['s_per_step'] / p['s_per_step']:.2f}x" if p else "-"
        rel_m = f"{r['peak_memory_mb'] / p['peak_memory_mb']:.2f}x" if p and p["peak_memory_mb"] > 0 else "-"
        teacher = {None: "-", True: "yes", False: "NO", "not run": "not run"}[r.get("predict_teacher")]
        student = {True: "yes", False: "NO", "not run": "not run", None: "NO"}[r.get("predict_checkpoint")]
        compile_note = "on" if r["compiled"] else ("off" if r["compile"] == "off" else "on (not compiled)")
        mem_note = "" if r.get("memory_kind") == meta["memory_kind"] else f" ({r.get('memory_kind')})"
        lines.append(f"| {r['trainer']} | {compile_note} | {r['s_per_step']:.3f} | {rel_t} | {r['compile_s']:.1f} | "
                     f"{r['peak_memory_mb']:.0f}{mem_note} | {rel_m} | {'yes' if r['finite_terms'] else 'NO'} | "
                     f"{student} | {teacher} |")
    if meta.get("ddp"):
        d = meta["ddp"]
        lines += ["", f"DDP (-num_gpus 2, CPCL): exit code {d['returncode']}, {d['ranks']} ranks reported "
                      f"{d['prototype_sets']} prototype sets, identical across ranks: {d['same_prototypes']}."]
    lines += ["", "Checkpoints hold no `_orig_mod.` keys: "
              + str(all(r.get("orig_mod_keys", 0) == 0 for r in results if "s_per_step" in r)) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", help="folder for gpu_check.json / gpu_check.md (and the work files)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--configuration", default="3d_fullres", help="3d_fullres (default) or 2d (CPU memory check)")
    p.add_argument("--no-predict", action="store_true", help="skip nnUNetv2_predict (memory/timing only)")
    p.add_argument("--tiny", action="store_true", help="tiny plan and images (CI on CPU)")
    p.add_argument("--steps", type=int, help="training steps per run (default 20 on CUDA, 3 with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="steps excluded from s/step (default 5 / 1)")
    p.add_argument("--trainers", nargs="+", help="default: nnUNetTrainer + every semi-supervised trainer")
    p.add_argument("--compile", nargs="+", choices=["off", "on"], default=None,
                   help="default: off and on (CUDA), off (CPU)")
    p.add_argument("--cpu-compile", action="store_true", help="CPU: lift nnU-Net's compile refusal (3D)")
    p.add_argument("--budget-min", type=float, default=7.0, help="skip runs that would end after this")
    p.add_argument("--labeled", type=int, default=6)
    p.add_argument("--unlabeled", type=int, default=4)
    p.add_argument("--shape", type=int, nargs=3)
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--run-timeout", type=int, default=900)
    # worker mode (one run in a fresh process)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--trainer", help=argparse.SUPPRESS)
    p.add_argument("--fold", type=int, help=argparse.SUPPRESS)
    p.add_argument("--plans", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = args.steps or (3 if args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device available (torch.cuda.is_available() is False): skipped")
        return 0
    out = Path(args.output).resolve()
    work = out / "work"
    env = dict(os.environ, nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "preprocessed"),
               nnUNet_results=str(work / "results"), nnUNet_extTrainer=str(REPO / "trainers"),
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    env.setdefault("nnUNet_n_proc_DA", "0" if args.device == "cpu" else "4")
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results",
                                           "nnUNet_extTrainer")})
    for folder in ("raw", "preprocessed", "results"):
        (work / folder).mkdir(parents=True, exist_ok=True)
    ds = prepare_dataset(args, work)
    trainers = args.trainers or [PLAIN] + semi_supervised_trainers()
    compiles = args.compile or (["off", "on"] if args.device == "cuda" or args.cpu_compile else ["off"])
    budget_s = args.budget_min * 60
    results, durations = [], []
    for compile_on in compiles:
        for trainer in trainers:
            elapsed = perf_counter() - T0
            expected = max(durations) if durations else 0.0
            if compile_on == "on" and not any(r.get("compile") == "on" for r in results):
                expected *= 3  # the first compiled run pays inductor's compilation
            if elapsed + expected > budget_s:
                results.append({"trainer": trainer, "compile": compile_on,
                                 "skipped": f"skipped: time budget ({args.budget_min:g} min)"})
                log(f"{trainer} compile {compile_on}: skipped (time budget)")
                continue
            log(f"{trainer}, compile {compile_on}: {args.steps} steps, then nnUNetv2_predict")
            t0 = perf_counter()
            r = run_one(args, env, trainer, ds, compile_on, work)
            durations.append(perf_counter() - t0)
            if "s_per_step" in r:
                log(f"  {r['s_per_step']:.3f} s/step, compile {r['compile_s']:.1f} s, peak {r['peak_memory_mb']:.0f} "
                    f"MB, finite {r['finite_terms']}, predict {r['predict_checkpoint']}/{r['predict_teacher']}")
            results.append(r)
    ddp = None
    if args.device == "cuda" and torch.cuda.device_count() >= 2:
        if perf_counter() - T0 + (max(durations) if durations else 0) * 2 < budget_s + 60:
            log("DDP: nnUNetv2_train -num_gpus 2 for CPCL")
            ddp = ddp_check(args, env, ds, work)
        else:
            ddp = {"returncode": None, "ranks": 0, "prototype_sets": 0, "same_prototypes": "skipped (time budget)"}
    first = next((r for r in results if "s_per_step" in r), {})
    meta = {"device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU",
            "torch": torch.__version__, "nnunet": _version("nnunetv2"),
            "gpus": torch.cuda.device_count() if args.device == "cuda" else 0, "plans": ds["plans"],
            "configuration": args.configuration,
            "patch": first.get("patch_size"), "batch": first.get("batch_size"), "steps": args.steps,
            "warmup": args.warmup, "amp": "fp16 autocast + GradScaler (nnU-Net)" if args.device == "cuda" else
            "none (CPU, fp32)", "memory_kind": first.get("memory_kind", "-"), "wall_s": perf_counter() - T0,
            "ddp": ddp}
    text = table(results, meta)
    print(text, flush=True)
    (out / "gpu_check.md").write_text(text)
    (out / "gpu_check.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=2, default=str))
    ok = all(r.get("finite_terms") and r.get("predict_checkpoint") and r.get("predict_teacher") is not False
             for r in results if "s_per_step" in r) and not any("error" in r for r in results)
    return 0 if ok else 1


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())

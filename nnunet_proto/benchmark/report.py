"""The benchmark report: README.md, summary.json and the figures of a benchmark's finished runs.

The report is built from modules that know nothing of each other's internals: ``results.py`` (the runs as
rows, paired statistics against plain nnU-Net), ``sections.py`` (the text sections), ``signal.py`` (the
semi-supervised signal from the training logs), ``ablation.py`` (variants against their base on validation) and
``plots.py`` (figures). This module puts them together.

Everything is computed twice: on the raw test predictions and after nnU-Net's own postprocessing (determined on
each run's validation predictions, see run_one.py). A run without post-processed metrics is listed as missing,
never filled in. The rows: plain nnU-Net, the A/A control (must match plain), every trainer and the EMA teacher
of each teacher-student trainer, the offline self-training student (``--self-training``; its cost includes its
teacher's training and the pseudo-labeling) and plain nnU-Net at equal compute (``--equal-compute``).
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from nnunet_proto.benchmark.ablation import ablation_rows, ablation_section
from nnunet_proto.benchmark.results import (
    CLASS_PRESENCE_MIN,
    KINDS,
    METRICS,
    Results,
    comparisons,
    is_trainer_row,
    short_name,
    split_row,
)
from nnunet_proto.benchmark.sections import (
    against_equal_compute,
    comparison_json,
    comparison_section,
    control_section,
    control_status,
    control_warning,
    cost_section,
    equal_compute_check,
    equal_compute_json,
    equal_compute_lines,
    equal_compute_section,
    islands_section,
    none_if_nan,
    postprocessing_section,
    presence_rows,
    presence_section,
    self_training_section,
    spread_section,
    tables,
    validation_agreement,
    validation_agreement_section,
)
from nnunet_proto.benchmark.signal import SIGNAL_TAIL_EPOCHS, signal_rows, signal_section
from nnunet_proto.benchmark.spec import PLAIN, BenchmarkSpec, is_self_training
from nnunet_proto.benchmark.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_RNG_SEED, CI_LEVEL, P_VALUE_TEXT

_none = none_if_nan


def summary_json(res: Results, comp: Dict[tuple, Optional[dict]], control: List[dict],
                 presence: List[dict], head: Dict[tuple, Optional[dict]], check: Optional[dict]) -> dict:
    """The machine-readable report (summary.json). Dice values are fractions (x100 = points), HD95 in mm."""
    spec = res.spec
    steps = spec.epochs * spec.iterations_per_epoch
    rows = []
    for amount in res.amounts:
        for trainer in res.trainers():
            if trainer == PLAIN or not res.has(trainer, amount):
                continue
            base, factor, is_teacher = split_row(trainer)
            cost = res.total_cost(trainer, amount)
            row = {"trainer": trainer, "display_name": short_name(trainer), "labeled_amount": amount,
                   "is_control": trainer == res.control,
                   "kind": ("ema_teacher" if is_teacher else "equal_compute" if factor != 1.0 else
                            "self_training" if is_self_training(base) else "trainer"),
                   "steps_factor": factor,
                   "seeds": sorted(k[2] for k in res.cases if k[:2] == (trainer, amount)),
                   "total_steps_per_run": res.steps(trainer),
                   "cost_vs_plain": {"steps": cost["steps_vs_plain"], "seconds": _none(cost["seconds_vs_plain"]),
                                     "pseudo_label_seconds": _none(cost["pseudo_label_seconds"])},
                   "validation_dice": _none(res.validation_dice(trainer, amount)),
                   "plain_validation_dice": _none(res.validation_dice(PLAIN, amount)),
                   "training_machines": res.training_machines(trainer),
                   "plain_training_machines": res.pace_machines(PLAIN),
                   "s_per_step": _none(res.seconds_per_step(trainer, amount)),
                   "s_per_step_vs_plain": _none(res.seconds_per_step(trainer, amount)
                                                / res.seconds_per_step(PLAIN, amount))}
            for kind in KINDS:
                c = comp[(trainer, amount, kind)]
                if c is None:
                    row[kind] = {"missing": "no post-processed metrics for this trainer or plain" if
                                 kind == "postprocessed" else "no paired plain run"}
                    continue
                row[kind] = comparison_json(c, res.label_names)
            rows.append(row)
    means = {f"{t}|{a}": {k: {m: res.summary(t, a, "fg", m, k) for m in METRICS} for k in KINDS}
             for t in res.trainers() for a in res.amounts}
    return {
        "benchmark": spec.name, "dataset": spec.dataset, "configuration": spec.configuration, "plans": spec.plans,
        "device": spec.device, "precision": spec.precision, "checkpoint": spec.checkpoint,
        "test_time_mirroring": spec.test_time_mirroring,
        "epochs": spec.epochs, "iterations_per_epoch": spec.iterations_per_epoch, "total_steps_per_run": steps,
        "equal_compute": {"factor": spec.equal_compute, "source": spec.equal_compute_source,
                          "measured": check} if spec.equal_compute is not None else None,
        "against_equal_compute": equal_compute_json(head, res.label_names) if spec.equal_compute is not None else None,
        "units": {"dice": "fraction (x100 = points)", "hd95": "mm", "delta": "trainer - plain nnU-Net"},
        "statistics": {"method": "hierarchical bootstrap: resample seeds, then test cases within each drawn seed",
                       "resamples": BOOTSTRAP_RESAMPLES, "rng_seed": BOOTSTRAP_RNG_SEED, "ci_level": CI_LEVEL,
                       "p_value": P_VALUE_TEXT, "reference_test": "two-sided Wilcoxon signed-rank over pooled "
                                                                  "(case, seed) pairs"},
        "comparisons": rows,
        "control": {"trainer": res.control, "rows": control,
                    "ok": all(c["matches_plain"] for c in control) if control else None,
                    "conclusive": all(c["conclusive"] for c in control) if control else None},
        "class_presence": {"threshold": CLASS_PRESENCE_MIN, "rows": presence,
                           "ok": all(r["ok"] for r in presence) if presence else None},
        "runs": {"finished": res.finished_runs(), "total": len(res.runs), "planned": res.planned,
                 "imported": [{"trainer": k[0], "labeled_amount": k[1], "seed": k[2], **{
                     f: v for f, v in o.items() if f in ("bundle", "exported_at", "machine")}}
                     for k, o in sorted(res.imported.items())],
                 "without_postprocessing": [{"trainer": t, "labeled_amount": a, "seed": s, "reason": r}
                                            for t, a, s, r in res.missing_postprocessing()]},
        "means": means,
        "validation_ranking": {a: _validation_ranking(res, a) for a in res.amounts},
        "islands": {f"{t}|{a}": {res.label_names[c]: v for c, v in m.items()}
                    for t in res.trainers() for a in res.amounts if (m := res.island_means(t, a))},
        "validation_islands": {f"{t}|{a}": {res.label_names[c]: v for c, v in m.items()}
                               for t in res.trainers() for a in res.amounts if (m := res.island_means(t, a, True))},
    }


def _validation_ranking(res: Results, amount: str) -> List[dict]:
    """Semi-supervised trainers (control excluded) by nnU-Net's validation Dice, best first: how the
    screening chooses what to confirm, on the fold's validation cases only. Trainers only: no EMA-teacher or
    equal-compute row (a teacher is confirmed with its trainer, and a row name is not a ``-tr`` argument)."""
    rows = [{"trainer": t, "validation_dice": res.validation_dice(t, amount)} for t in res.trainers()
            if t not in (PLAIN, res.control) and is_trainer_row(t) and res.has(t, amount)]
    rows = [r for r in rows if not math.isnan(r["validation_dice"])]
    return sorted(rows, key=lambda r: -r["validation_dice"])


NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def portable(text: str) -> str:
    """A path or command as a reader of the report can use it: the exported nnU-Net folders of this machine
    become ``$nnUNet_raw`` etc. (the longest root first, only where a path starts) and the value of the
    benchmark's report option (``-o`` / ``--output``) becomes ``<report folder>``."""
    import shlex

    roots = sorted(((os.environ.get(v, "").rstrip("/"), v) for v in NNUNET_FOLDERS), key=lambda r: -len(r[0]))

    def swap(path: str) -> str:
        for root, var in roots:
            if root and os.path.isabs(root) and (path == root or path.startswith(root + "/")):
                return "$" + var + path[len(root):]
        return path

    try:
        words = shlex.split(text)
    except ValueError:  # not a command line (unbalanced quotes): paths only
        words = None
    if words is None or len(words) == 1:
        return swap(text)
    out, i = [], 0
    while i < len(words):
        w = words[i]
        if w in ("-o", "--output") and i + 1 < len(words):
            out += [w, "<report folder>"]
            i += 2
            continue
        if w.startswith("--output="):
            w = "--output=<report folder>"
        elif w.startswith("-") and "=" in w:
            key, _, value = w.partition("=")
            w = f"{key}={swap(value)}"
        else:
            w = swap(w)
        out.append(w)
        i += 1

    def quote(word: str) -> str:  # $nnUNet_* stays expandable; the placeholder stays readable
        if "<report folder>" in word or re.fullmatch(r"[\w@%+=:,./-]*(\$nnUNet_\w+[\w@%+=:,./-]*)?", word):
            return word
        return shlex.quote(word)

    return " ".join(quote(w) for w in out)


def write_report(spec: BenchmarkSpec, results_root: Path, report_dir: Path, failed: Optional[List[str]] = None) -> Path:
    """Write README.md, summary.json and the plots of every finished run into report_dir; returns README.md."""
    report_dir.mkdir(parents=True, exist_ok=True)
    res = Results(spec, results_root)
    done, total = res.finished_runs(), res.planned
    comp = comparisons(res)
    control = control_status(res, comp)
    presence = presence_rows(res)
    head = against_equal_compute(res)  # every row against plain at equal compute (none without that row)
    check = equal_compute_check(res)  # whether the equal-compute factor covers the costliest row (None without it)
    from nnunet_proto.benchmark.plots import plots  # matplotlib only when a report is written

    images = plots(res, report_dir, comp) if res.cases else []
    folds = sorted({(r.amount, r.seed, r.fold) for r in res.runs})
    chosen = "end of training" if spec.checkpoint == "final" else "nnU-Net's best on the fold's validation cases"
    lines = [f"# Benchmark: {spec.name}", ""] + control_warning(res, control)
    lines += [f"Dataset {spec.dataset}, configuration `{spec.configuration}`, plans `{spec.plans}`, device "
              f"`{spec.device}`, training precision `{spec.precision}`"
              f"{' (CPU bfloat16 autocast; plain = nnUNetTrainer_cpubf16)' if spec.precision == 'bf16' else ''}. "
              f"Budget per run: {spec.epochs} epochs x {spec.iterations_per_epoch} iterations "
              f"({spec.epochs * spec.iterations_per_epoch} iterations), identical for every trainer. Evaluated "
              f"checkpoint: `{spec.checkpoint}` ({chosen}), never chosen on the test set. Test set: "
              f"`{portable(spec.test_labels)}`, predicted with nnU-Net's sliding window "
              f"{'and mirroring' if spec.test_time_mirroring else 'without mirroring (--disable-tta)'}. "
              f"Runs finished: {done}/{total}.", ""]
    if spec.equal_compute is not None:
        lines += [f"**Plain nnU-Net at equal compute** (`nnUNetTrainer ×{spec.equal_compute:g} steps`): plain "
                  f"nnU-Net again on the same folds, trained for {spec.equal_compute:g} × the steps "
                  f"({int(round(spec.epochs * spec.equal_compute)) * spec.iterations_per_epoch} iterations, its own "
                  f"learning-rate schedule over them): what a fixed compute budget buys without unlabeled data. "
                  f"Factor: {spec.equal_compute_source}.", ""] + equal_compute_lines(check)
    if spec.notes:
        lines += [spec.notes, ""]
    if res.imported:
        lines += [f"**{len(res.imported)} run(s) trained on another machine** and imported with their records "
                  f"(`--import-runs`; paired with plain nnU-Net on the same test cases like any run, but trained with "
                  f"their machine's numerics, and their seconds in the Cost section are that machine's): "
                  + "; ".join(f"{k[0]} labeled {k[1]} seed {k[2]} (exported {o.get('exported_at')}, "
                              f"{o.get('machine')})" for k, o in sorted(res.imported.items())) + ".", ""]
    if failed:
        lines += [f"**Failed runs (not in the tables):** {', '.join(failed)}.", ""]
    missing = res.missing_postprocessing()
    if missing:
        lines += [f"**{len(missing)} run(s) without post-processed numbers** (marked missing, never filled in): "
                  + ", ".join(f"{t} labeled {a} seed {s}" for t, a, s, _ in missing)
                  + ". Reasons in the Postprocessing section.", ""]
    lines += ["Label-scarce folds (splits_final.json): " + ", ".join(f"labeled {a}, seed {s} → fold {f}"
                                                                    for a, s, f in folds), ""]
    lines += ["## Against plain nnU-Net", ""] + comparison_section(res, comp)
    if spec.equal_compute is not None:
        lines += ["## Against plain nnU-Net at equal compute", ""] + equal_compute_section(res, head)
    lines += ["## A/A control", ""] + control_section(res, control)
    lines += ["## Run-to-run spread and power", ""] + spread_section(res, comp)
    agreement = validation_agreement(res)
    lines += ["## Validation as a guide", ""] + validation_agreement_section(agreement)
    ablations = ablation_rows(res)
    lines += ["## Validation ablations", ""] + ablation_section(res, ablations)
    lines += ["## No class lost", ""] + presence_section(res, presence)
    lines += ["## Test results", ""] + tables(res)
    lines += ["## Test results after nnU-Net's postprocessing", ""] + tables(res, "postprocessed", ("Dice", "HD95"))
    lines += ["## Stray islands", ""] + islands_section(res)
    signal = signal_rows(res)
    lines += ["## Semi-supervised signal", ""] + signal_section(res, signal)
    lines += ["## Offline self-training", ""] + self_training_section(res)
    lines += ["## Postprocessing", ""] + postprocessing_section(res)
    lines += ["## Cost", "", "Seconds per epoch from nnU-Net's epoch timestamps (training + its validation "
              "iterations), peak memory of the training process. Runs ran one after another on the same machine; "
              "other work on the machine inflates absolute times, compare ratios with care.", ""]
    lines += cost_section(res)
    if "validation_dice_vs_compute.png" in images:
        lines += ["`validation_dice_vs_compute.png` (Plots) shows each row's nnU-Net validation Dice against its "
                  "*total time vs plain*; the black line joins plain and plain at equal compute. Plain nnU-Net's "
                  "learning curve is usually concave, so between its two points the line lies at or below what plain "
                  "would reach: a row under the line is behind plain trained as long, a row above it is not "
                  "necessarily ahead, and a row beyond the equal-compute factor is outside what the line measures.",
                  ""]
    lines += ["## Plots", ""] + [f"![{f}]({f})" for f in images] + [""]
    lines += ["## Reproduce", "", "With the same nnU-Net folders exported (the dataset converted, planned and "
              "preprocessed as in its notes), this command trains whatever runs are missing and rewrites the "
              "report; add `--report-only` to rewrite it from the finished runs only.", "",
              "```", portable(spec.extra.get("command", "(command not recorded)")), "```", ""]
    out = report_dir / "README.md"
    out.write_text("\n".join(lines))
    summary = summary_json(res, comp, control, presence, head, check)
    summary["semi_supervised_signal"] = {"tail_epochs": SIGNAL_TAIL_EPOCHS, "rows": signal}
    summary["validation_agreement"] = agreement
    summary["validation_ablations"] = ablations
    (report_dir / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2, allow_nan=False,
                                                        ensure_ascii=False))
    return out


def _json_safe(obj):
    """NaN -> null, tuples -> lists: summary.json is strict JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj

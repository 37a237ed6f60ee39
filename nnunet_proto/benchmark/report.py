"""The benchmark report: paired statistics against plain nnU-Net, the A/A control, class presence, tables, plots.

Everything is computed twice: on the raw test predictions and after nnU-Net's own postprocessing
(determined on each run's validation predictions, see run_one.py). A run without post-processed
metrics is listed as missing, never filled in.

Statistics:
* per run, each metric is averaged over the test cases (undefined values excluded, see docs/evaluation.md);
* the tables show, per trainer and labeled amount, the mean over seeds of those per-run means, ± the
  standard deviation over seeds when there are several seeds, else ± the standard deviation over
  test cases (the report says which);
* against plain nnU-Net (same fold, same seed, same test cases): Δ with a 95 % CI and a two-sided p
  from a hierarchical bootstrap over seeds, then test cases (stats.py); the Wilcoxon signed-rank p over
  the pooled (case, seed) pairs for reference; wins/losses; HD95 Δ; per-class Dice Δ; s/step ratio;
* the A/A control (spec.control) must match plain: its Dice Δ CI must contain 0, else a loud warning;
* no class lost: every class predicted in >= 95 % of the test frames whose reference contains it;
* run-to-run spread: each seed's Δ, their standard deviation over seeds and the seeds a +3-point effect
  would need (80 % power, two-sided 5 %; stats.seeds_for_power), so a null result says how far it is from
  being able to show the target;
* stray islands of the raw test predictions (evaluation/islands.py): connected components per class and the
  share of predicted voxels outside the largest one, what nnU-Net's postprocessing removes.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from nnunet_proto.benchmark.spec import CONTROL, PLAIN, BenchmarkSpec, Run, load_runs
from nnunet_proto.benchmark.stats import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_RNG_SEED,
    CI_LEVEL,
    P_VALUE_TEXT,
    TARGET_EFFECT,
    BootstrapResult,
    hierarchical_bootstrap,
    seed_t_test_p,
    seeds_for_power,
    wilcoxon_p,
)
from nnunet_proto.evaluation.islands import CACHE_NAME as ISLANDS_CACHE
from nnunet_proto.evaluation.islands import cached_folder_islands
from nnunet_proto.evaluation.metrics import RULE_BOTH_PRESENT as RULE_PRESENT
from nnunet_proto.evaluation.metrics import RULE_PREDICTION_EMPTY as RULE_PRED_EMPTY

METRICS = ("Dice", "IoU", "HD95", "ASD")
HIGHER_IS_BETTER = {"Dice": True, "IoU": True, "HD95": False, "ASD": False}


def short_name(trainer: str) -> str:
    """A trainer's name without the ``nnUNetTrainer`` prefix (plain nnU-Net: "plain"), for tables and plots."""
    return trainer.replace("nnUNetTrainer", "") or "plain"


def _nanmean(values) -> float:
    a = np.asarray([v for v in values if v is not None], dtype=float)
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else math.nan


def _nanstd(values) -> float:
    a = np.asarray([v for v in values if v is not None], dtype=float)
    a = a[~np.isnan(a)]
    return float(a.std(ddof=1)) if a.size > 1 else math.nan


def case_table(metrics: dict) -> Dict[str, Dict[str, dict]]:
    """{case: {label or 'fg': {metric: value, 'rule': empty-mask rule}}} from an evaluate_folders JSON.

    'fg' is the mean over classes of the defined values (no rule).
    """
    out = {}
    for entry in metrics["metric_per_case"]:
        per_label = {lab: {**{m: (v[m] if v[m] is not None else math.nan) for m in METRICS}, "rule": v.get("rule")}
                     for lab, v in entry["metrics"].items()}
        per_label["fg"] = {m: _nanmean([per_label[lab][m] for lab in entry["metrics"]]) for m in METRICS}
        out[entry["case"]] = per_label
    return out


KINDS = ("raw", "postprocessed")
KIND_TITLE = {"raw": "raw predictions", "postprocessed": "after nnU-Net's postprocessing"}
CLASS_PRESENCE_MIN = 0.95  # "no class lost": each class predicted in >= 95 % of the frames that contain it
OLD_RUN_REASON = ("postprocessing stage not run (finished by an older version of the benchmark); re-run the "
                  "benchmark command to complete it without retraining")


class Results:
    """All finished runs of a benchmark, indexed by (trainer, amount, seed), raw and post-processed."""

    def __init__(self, spec: BenchmarkSpec, results_root: Path):
        self.spec = spec
        self.runs: List[Run] = load_runs(results_root / "runs.json")
        # every run the spec asks for (plain, control, trainers x amounts x seeds) plus any other registered one
        # (an earlier invocation's), so that a report of an unfinished benchmark says how much is still to come
        self.planned = len({(t, str(a), int(s)) for t in spec.all_trainers for a in spec.amounts for s in spec.seeds}
                           | {(r.trainer, str(r.amount), int(r.seed)) for r in self.runs})
        self.cases_by_kind: Dict[str, Dict[tuple, dict]] = {k: {} for k in KINDS}
        self.cases = self.cases_by_kind["raw"]
        self.pp_status: Dict[tuple, dict] = {}
        self.info: Dict[tuple, dict] = {}
        self.curves: Dict[tuple, dict] = {}
        self.label_names: Dict[str, str] = {}
        for run in self.runs:
            d = run.dir(results_root / "runs")
            if not (d / "metrics.json").is_file():
                continue
            key = (run.trainer, run.amount, run.seed)
            metrics = json.loads((d / "metrics.json").read_text())
            self.cases[key] = case_table(metrics)
            self.label_names.update({lab: v.get("name", lab) for lab, v in metrics["mean"].items()})
            status = json.loads((d / "postprocessing.json").read_text()) if (d / "postprocessing.json").is_file() \
                else {"available": False, "reason": OLD_RUN_REASON}
            if status.get("available") and (d / "metrics_postprocessed.json").is_file():
                self.cases_by_kind["postprocessed"][key] = case_table(
                    json.loads((d / "metrics_postprocessed.json").read_text()))
            elif status.get("available"):
                status = {"available": False, "reason": f"metrics_postprocessed.json missing in {d}"}
            self.pp_status[key] = status
            self.info[key] = json.loads((d / "run_info.json").read_text()) if (d / "run_info.json").is_file() else {}
            if (d / "curves.json").is_file():
                self.curves[key] = json.loads((d / "curves.json").read_text())
        self.classes = sorted(self.label_names, key=int)
        self.islands: Dict[tuple, dict] = {}  # raw test predictions' stray islands, per run (cached in the run dir)
        for run in self.runs:
            d, key = run.dir(results_root / "runs"), (run.trainer, run.amount, run.seed)
            pred = d / "test_predictions"
            if key in self.cases and pred.is_dir():
                ds = pred / "dataset.json"
                ending = json.loads(ds.read_text()).get("file_ending", ".nii.gz") if ds.is_file() else ".nii.gz"
                try:
                    self.islands[key] = cached_folder_islands(pred, [int(c) for c in self.classes],
                                                              d / ISLANDS_CACHE, ending)["mean"]
                except FileNotFoundError:  # predictions deleted to save space: the section says so
                    pass
        self.labels = self.classes + ["fg"]
        self.label_names["fg"] = "mean"
        # runs.json accumulates every invocation of this benchmark (more seeds or trainers later)
        self.seeds = sorted({r.seed for r in self.runs})
        self.amounts = list(dict.fromkeys(r.amount for r in self.runs))
        # the A/A control of this invocation, or of an earlier one whose runs are part of the benchmark
        self.control: Optional[str] = spec.control or (CONTROL if any(r.trainer == CONTROL for r in self.runs)
                                                       else None)

    def trainers(self) -> List[str]:
        order = list(dict.fromkeys([PLAIN, *self.spec.all_trainers, *(r.trainer for r in self.runs)]))
        return [t for t in order if any(k[0] == t for k in self.cases)]

    def has(self, trainer: str, amount: str, kind: str = "raw") -> bool:
        return any(k[:2] == (trainer, amount) for k in self.cases_by_kind[kind])

    def run_means(self, trainer: str, amount: str, label: str, metric: str, kind: str = "raw") -> List[float]:
        return [self.run_means_for((trainer, amount, s), kind, label, metric)
                for s in self.seeds if (trainer, amount, s) in self.cases_by_kind[kind]]

    def run_means_for(self, key: tuple, kind: str = "raw", label: str = "fg", metric: str = "Dice") -> float:
        """One run's (trainer, amount, seed) mean over its test cases; NaN when the run has no such metrics."""
        cases = self.cases_by_kind[kind].get(key)
        return _nanmean([c[label][metric] for c in cases.values()]) if cases else math.nan

    def summary(self, trainer: str, amount: str, label: str, metric: str, kind: str = "raw"):
        """(mean over seeds of per-run means, sd over seeds or, with one seed, over cases, number of seeds)."""
        cases = self.cases_by_kind[kind]
        means = self.run_means(trainer, amount, label, metric, kind)
        if not means:
            return math.nan, math.nan, 0
        if len(means) > 1:
            return float(np.mean(means)), float(np.std(means, ddof=1)), len(means)
        only = cases[(trainer, amount, next(s for s in self.seeds if (trainer, amount, s) in cases))]
        return means[0], _nanstd([c[label][metric] for c in only.values()]), 1

    def seed_differences(self, trainer: str, amount: str, metric: str = "Dice", label: str = "fg",
                         kind: str = "raw") -> Dict[int, np.ndarray]:
        """{seed: trainer − plain per test case (sorted case ids, NaN where undefined)} for the seeds where both
        ran (same fold, same test cases)."""
        cases = self.cases_by_kind[kind]
        out = {}
        for s in self.seeds:
            a, b = cases.get((trainer, amount, s)), cases.get((PLAIN, amount, s))
            if a is None or b is None:
                continue
            common = sorted(set(a) & set(b))
            if common:
                out[s] = np.array([a[c][label][metric] - b[c][label][metric] for c in common], dtype=float)
        return out

    def paired(self, trainer: str, amount: str, metric: str = "Dice", label: str = "fg",
               kind: str = "raw") -> Optional[dict]:
        """Wilcoxon signed-rank test of trainer vs plain nnU-Net on the pooled (case, seed) pairs."""
        diffs = self.seed_differences(trainer, amount, metric, label, kind)
        diff = np.concatenate(list(diffs.values())) if diffs else np.zeros(0)
        diff = diff[~np.isnan(diff)]
        if diff.size < 2:
            return None
        better = (diff > 0) if HIGHER_IS_BETTER[metric] else (diff < 0)
        worse = (diff < 0) if HIGHER_IS_BETTER[metric] else (diff > 0)
        return {"n": int(diff.size), "mean_diff": float(diff.mean()), "median_diff": float(np.median(diff)),
                "p": wilcoxon_p(diff), "wins": int(better.sum()), "losses": int(worse.sum())}

    def seconds_per_step(self, trainer: str, amount: str) -> float:
        """Median over the trainer's runs at this amount of the median seconds per training iteration."""
        v = [i.get("seconds_per_iteration_median") for k, i in self.info.items() if k[:2] == (trainer, amount)]
        v = [x for x in v if x]
        return float(np.median(v)) if v else math.nan

    def validation_dice(self, trainer: str, amount: str) -> float:
        """Mean over the trainer's runs at this amount of nnU-Net's foreground Dice on the fold's validation
        cases (the number to choose trainers and defaults on; never the test cases)."""
        v = [i.get("validation_foreground_dice") for k, i in self.info.items() if k[:2] == (trainer, amount)]
        v = [x for x in v if x is not None]
        return float(np.mean(v)) if v else math.nan

    def island_means(self, trainer: str, amount: str) -> Dict[str, Dict[str, float]]:
        """Per class, the mean over seeds of each run's mean components per case and share outside the largest."""
        runs = [v for k, v in self.islands.items() if k[:2] == (trainer, amount)]
        return {c: {m: _nanmean([r[c][m] for r in runs]) for m in ("components", "outside_largest")}
                for c in self.classes} if runs else {}

    def compare(self, trainer: str, amount: str, kind: str = "raw") -> Optional[dict]:
        """Every paired statistic of one row (trainer vs plain at one labeled amount), or None without pairs."""
        dice = self.seed_differences(trainer, amount, "Dice", "fg", kind)
        if not dice or all(np.isnan(d).all() for d in dice.values()):
            return None
        boot = hierarchical_bootstrap(list(dice.values()))
        pooled = np.concatenate(list(dice.values()))
        pooled = pooled[~np.isnan(pooled)]
        hd = self.seed_differences(trainer, amount, "HD95", "fg", kind)
        hd_boot = _maybe_bootstrap(hd)
        per_class = {lab: _maybe_bootstrap(self.seed_differences(trainer, amount, "Dice", lab, kind))
                     for lab in self.classes}
        return {"seeds": sorted(dice), "n_pairs": boot.n_pairs, "dice": boot, "p_wilcoxon": wilcoxon_p(pooled),
                "wins": int((pooled > 0).sum()), "losses": int((pooled < 0).sum()), "hd95": hd_boot,
                "p_wilcoxon_hd95": wilcoxon_p(np.concatenate(list(hd.values()))), "per_class_dice": per_class,
                "seed_spread": seed_spread(dice)}

    def class_presence(self, trainer: str, amount: str, kind: str = "raw") -> Dict[str, tuple]:
        """{class: (fraction, n)}: share of the (case, seed) frames whose reference contains the class in which
        the prediction contains it too (nnunet_proto evaluate's rules: both_present vs prediction_empty)."""
        cases = self.cases_by_kind[kind]
        out = {}
        for lab in self.classes:
            rules = [c[lab].get("rule") for k, run in cases.items() if k[:2] == (trainer, amount)
                     for c in run.values()]
            n = sum(r in (RULE_PRESENT, RULE_PRED_EMPTY) for r in rules)
            out[lab] = (sum(r == RULE_PRESENT for r in rules) / n if n else math.nan, n)
        return out

    def missing_postprocessing(self) -> List[tuple]:
        """[(trainer, amount, seed, reason)] of finished runs without post-processed metrics."""
        return [(*k, self.pp_status[k].get("reason", "unknown")) for k in self.cases
                if k not in self.cases_by_kind["postprocessed"]]


def _maybe_bootstrap(diffs: Dict[int, np.ndarray]) -> Optional[BootstrapResult]:
    values = [d for d in diffs.values() if not np.isnan(d).all()]
    return hierarchical_bootstrap(values) if values else None


def _fmt(mean: float, sd: float, metric: str) -> str:
    if math.isnan(mean):
        return "–"
    scale, digits = (100.0, 1) if metric in ("Dice", "IoU") else (1.0, 2)
    sd_txt = "" if math.isnan(sd) else f" ± {sd * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f}{sd_txt}"


def _ci_txt(b: Optional[BootstrapResult], scale: float, digits: int) -> str:
    if b is None:
        return "–"
    return f"{b.delta * scale:+.{digits}f} [{b.ci_low * scale:+.{digits}f}, {b.ci_high * scale:+.{digits}f}]"


def _p(p: Optional[float]) -> str:
    return "–" if p is None or math.isnan(p) else f"{p:.2g}"


def tables(res: Results, kind: str = "raw", metrics=METRICS) -> List[str]:
    several = len(res.seeds) > 1
    lines = [f"Values: mean ± sd; sd over {'seeds (of per-run means over test cases)' if several else 'test cases'}. "
             f"Dice and IoU in %, HD95 and ASD in mm.", ""]
    for metric in metrics:
        lines += [f"### {metric}" + ("" if kind == "raw" else f", {KIND_TITLE[kind]}"), "",
                  "| labeled | trainer | " + " | ".join(res.label_names[lab] for lab in res.labels) + " |",
                  "|---|---|" + "---|" * len(res.labels)]
        for amount in res.amounts:
            for trainer in res.trainers():
                n_seeds = res.summary(trainer, amount, "fg", metric, kind)[2]
                if n_seeds == 0:
                    if kind != "raw" and res.has(trainer, amount):
                        lines.append(f"| {amount} | {trainer} | " + " | ".join(
                            ["missing (no post-processed metrics, see below)"] + ["–"] * (len(res.labels) - 1))
                            + " |")
                    continue
                cells = [_fmt(*res.summary(trainer, amount, lab, metric, kind)[:2], metric) for lab in res.labels]
                n_raw = res.summary(trainer, amount, "fg", metric)[2]
                mark = "" if n_seeds == len(res.seeds) else f" ({n_seeds} of {len(res.seeds)} seeds)"
                if kind != "raw" and n_seeds < n_raw:
                    mark += " (some runs lack post-processed metrics)"
                lines.append(f"| {amount} | {trainer}{mark} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def comparisons(res: Results) -> Dict[tuple, Optional[dict]]:
    """{(trainer, amount, kind): Results.compare(...)} for every trainer except plain."""
    return {(t, a, k): res.compare(t, a, k) for a in res.amounts for t in res.trainers() if t != PLAIN
            for k in KINDS}


def comparison_section(res: Results, comp: Dict[tuple, Optional[dict]]) -> List[str]:
    n_b = next((c["dice"].resamples for c in comp.values() if c), BOOTSTRAP_RESAMPLES)
    lines = [f"Δ = trainer − plain nnU-Net trained on the same labeled cases with the same seed, on the same test "
             f"cases; Dice in points, HD95 in mm. Δ is the mean over seeds of each seed's mean over test cases. "
             f"The 95 % CI and p come from a hierarchical bootstrap ({n_b} resamples, fixed RNG seed "
             f"{BOOTSTRAP_RNG_SEED}): resample the seeds with replacement, then the test cases within each drawn "
             f"seed, so that run-to-run variance counts; {P_VALUE_TEXT}. The Wilcoxon p (scipy, over the pooled "
             f"(case, seed) pairs) is for reference only: it treats pairs as independent and ignores run-to-run "
             f"variance. Wins/losses: pairs where the trainer's Dice is higher/lower. s/step: median seconds per "
             f"training iteration, relative to plain at the same amount.", ""]
    if len(res.seeds) == 1:
        lines += ["**One seed only:** the seed level cannot be resampled, so the CI covers case-to-case variation "
                  "of these single runs, not run-to-run variance; it is not evidence about the methods.", ""]
    elif len(res.seeds) < 5:
        lines += [f"With {len(res.seeds)} seeds the seed level is resampled from {len(res.seeds)} values; the CI is "
                  f"then somewhat too narrow (the bootstrap variance of a mean of S clusters is (S−1)/S of the "
                  f"usual estimate).", ""]
    few = sorted({c["n_pairs"] for c in comp.values() if c and c["n_pairs"] < 20})
    if few:
        lines += [f"**Few pairs ({', '.join(map(str, few))}):** a bootstrap over so few test cases understates the "
                  f"spread (with n = 2 equal-signed differences every resample has the same sign); read these "
                  f"intervals as descriptive only.", ""]
    for kind in KINDS:
        lines += [f"### {KIND_TITLE[kind][0].upper()}{KIND_TITLE[kind][1:]}", "",
                  "| labeled | trainer | seeds | steps/run | n pairs | Dice Δ [95 % CI] | p (bootstrap) | "
                  "p (Wilcoxon) | wins/losses | HD95 Δ [95 % CI] | HD95 p (bootstrap) | s/step vs plain |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for amount in res.amounts:
            for trainer in res.trainers():
                if trainer == PLAIN or not res.has(trainer, amount):
                    continue
                c = comp[(trainer, amount, kind)]
                ratio = res.seconds_per_step(trainer, amount) / res.seconds_per_step(PLAIN, amount)
                ratio_txt = "–" if math.isnan(ratio) else f"{ratio:.2f}x"
                steps = res.spec.epochs * res.spec.iterations_per_epoch
                if c is None:
                    why = ("missing: no post-processed metrics for this trainer or plain (see Postprocessing)"
                           if kind == "postprocessed" else "no paired plain run")
                    lines.append(f"| {amount} | {trainer} | – | {steps} | 0 | {why} | – | – | – | – | – | "
                                 f"{ratio_txt} |")
                    continue
                hd = c["hd95"]
                lines.append(
                    f"| {amount} | {trainer} | {','.join(map(str, c['seeds']))} | {steps} | {c['n_pairs']} | "
                    f"{_ci_txt(c['dice'], 100, 1)} | {_p(c['dice'].p)} | {_p(c['p_wilcoxon'])} | "
                    f"{c['wins']}/{c['losses']} | {_ci_txt(hd, 1, 1)} | {_p(hd.p if hd else None)} | {ratio_txt} |")
        lines.append("")
    lines += ["### Per-class Dice Δ [95 % CI] (points)", "",
              "| labeled | trainer | predictions | " + " | ".join(res.label_names[c] for c in res.classes) + " |",
              "|---|---|---|" + "---|" * len(res.classes)]
    for amount in res.amounts:
        for trainer in res.trainers():
            for kind in KINDS:
                c = comp.get((trainer, amount, kind))
                if c is None:
                    continue
                lines.append(f"| {amount} | {trainer} | {kind} | "
                             + " | ".join(_ci_txt(c["per_class_dice"][lab], 100, 1) for lab in res.classes) + " |")
    return lines + [""]


def seed_spread(diffs: Dict[int, np.ndarray]) -> Optional[dict]:
    """From ``{seed: paired differences}`` (Results.seed_differences): each seed's Δ (mean over its test cases),
    their sd over seeds, the seed-level t-test p and the seeds a +TARGET_EFFECT difference would need at that
    sd; None with fewer than 2 seeds."""
    per_seed = {s: float(np.nanmean(d)) for s, d in diffs.items() if not np.isnan(d).all()}
    if len(per_seed) < 2:
        return None
    deltas = list(per_seed.values())
    sd = float(np.std(deltas, ddof=1))
    return {"seed_deltas": per_seed, "sd_over_seeds": sd, "p_t_over_seeds": seed_t_test_p(deltas),
            "seeds_for_target": seeds_for_power(sd), "target_effect": TARGET_EFFECT}


def spread_section(res: Results, comp: Dict[tuple, Optional[dict]]) -> List[str]:
    lines = [f"Each seed's foreground Dice Δ against plain (mean over that seed's test cases, points), their "
             f"standard deviation over seeds, and the number of seeds a true difference of "
             f"{100 * TARGET_EFFECT:.0f} points would need to be detected with 80 % power by a two-sided test at "
             f"5 % at that spread (normal approximation, S = ((1.96 + 0.84) · sd / {100 * TARGET_EFFECT:.0f})²; "
             f"a lower bound, since sd comes from few seeds). The A/A control's row is the spread of two "
             f"trainers with the same signal: the noise floor of this benchmark. *p (t over seeds)*: two-sided "
             f"one-sample t-test of the per-seed Δ against 0 (S − 1 degrees of freedom), the seed-level test; "
             f"with few seeds it is the conservative companion of the bootstrap p above.", "",
             "| labeled | trainer | predictions | Δ per seed | sd over seeds | p (t over seeds) | seeds for a "
             f"{100 * TARGET_EFFECT:.0f}-point effect |", "|---|---|---|---|---|---|---|"]
    rows = 0
    for amount in res.amounts:
        for trainer in res.trainers():
            if trainer == PLAIN:
                continue
            for kind in KINDS:
                c = comp.get((trainer, amount, kind))
                sp = c["seed_spread"] if c else None
                if sp is None:
                    continue
                rows += 1
                per = ", ".join(f"s{s} {100 * d:+.1f}" for s, d in sorted(sp["seed_deltas"].items()))
                need = sp["seeds_for_target"]
                lines.append(f"| {amount} | {trainer} | {kind} | {per} | {100 * sp['sd_over_seeds']:.1f} | "
                             f"{_p(sp['p_t_over_seeds'])} | {'–' if math.isnan(need) else int(need)} |")
    if not rows:
        return ["Needs at least two seeds with a paired plain run.", ""]
    return lines + [""]


def validation_agreement(res: Results) -> List[dict]:
    """Per amount and kind: does nnU-Net's validation Dice (the number trainers and defaults are chosen on) move
    with the test Dice? For every (trainer, seed) with a paired plain run, Δ validation against Δ test (both
    trainer − plain, fold-mean foreground Dice); their Pearson r and the share of pairs with the same sign."""
    out = []
    for amount in res.amounts:
        for kind in KINDS:
            pairs = []
            for trainer in res.trainers():
                if trainer == PLAIN:
                    continue
                for seed in res.seeds:
                    a, b = (trainer, amount, seed), (PLAIN, amount, seed)
                    va = res.info.get(a, {}).get("validation_foreground_dice")
                    vb = res.info.get(b, {}).get("validation_foreground_dice")
                    ta = res.run_means_for(a, kind)
                    tb = res.run_means_for(b, kind)
                    if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in (va, vb, ta, tb)):
                        continue
                    pairs.append((trainer, seed, va - vb, ta - tb))
            if len(pairs) < 3:
                continue
            dv = np.array([p[2] for p in pairs])
            dt = np.array([p[3] for p in pairs])
            r = float(np.corrcoef(dv, dt)[0, 1]) if dv.std() > 0 and dt.std() > 0 else math.nan
            out.append({"labeled_amount": amount, "kind": kind, "n_pairs": len(pairs), "pearson_r": r,
                        "same_sign": float(np.mean(np.sign(dv) == np.sign(dt))),
                        "pairs": [{"trainer": t, "seed": sd, "validation_delta": v, "test_delta": d}
                                  for t, sd, v, d in pairs]})
    return out


def validation_agreement_section(rows: List[dict]) -> List[str]:
    if not rows:
        return ["Needs at least three (trainer, seed) runs with validation Dice and a paired plain run.", ""]
    lines = ["Trainers and defaults are chosen on nnU-Net's validation of the fold, never on the test cases. Whether "
             "that is a sound guide: for every (trainer, seed) with a paired plain run, the validation Dice Δ "
             "against plain next to the test Dice Δ against plain (foreground mean, points); their correlation "
             "and how often both have the same sign.", "",
             "| labeled | predictions | pairs | Pearson r (Δ validation, Δ test) | same sign | pairs (Δ validation → Δ "
             "test) |", "|---|---|---|---|---|---|"]
    for r in rows:
        detail = "; ".join(f"{short_name(p['trainer'])} s{p['seed']} {100 * p['validation_delta']:+.1f} → "
                           f"{100 * p['test_delta']:+.1f}" for p in r["pairs"])
        corr = "–" if math.isnan(r["pearson_r"]) else f"{r['pearson_r']:.2f}"
        lines.append(f"| {r['labeled_amount']} | {r['kind']} | {r['n_pairs']} | {corr} | "
                     f"{100 * r['same_sign']:.0f} % | {detail} |")
    return lines + [""]


def control_status(res: Results, comp: Dict[tuple, Optional[dict]]) -> List[dict]:
    """One entry per (amount, kind) of the A/A control: Δ, CI and whether the CI contains 0."""
    control = res.control
    out = []
    for (t, a, k), c in comp.items():
        if t == control and c is not None:
            out.append({"labeled_amount": a, "kind": k, "dice_delta": c["dice"].delta,
                        "dice_ci": [c["dice"].ci_low, c["dice"].ci_high], "p_bootstrap": c["dice"].p,
                        "matches_plain": c["dice"].contains(0.0), "seeds": len(c["seeds"]),
                        # with one seed the CI resamples test cases only: run-to-run variation is not in it
                        "conclusive": len(c["seeds"]) >= 2})
    return out


def control_section(res: Results, status: List[dict]) -> List[str]:
    control = res.control
    if not control:
        return ["No A/A control in this benchmark (--no-control, or a benchmark started before the control "
                "existed).", ""]
    lines = [f"`{control}` runs the semi-supervised base trainer's whole path (unlabeled stream, teacher, "
             f"logging, checkpointing) with every semi-supervised weight at 0. It must match plain nnU-Net "
             f"within the bootstrap CI; if it does not, the shared glue has a defect, and method comparisons "
             f"wait until it is found.", ""]
    if not status:
        return lines + [f"No finished `{control}` run paired with plain yet.", ""]
    for st in status:
        verdict = ("matches plain (CI contains 0)" if st["matches_plain"] else "**DIFFERS from plain**"
                   if st["conclusive"] else "differs from plain at one seed (not conclusive: with one seed the CI "
                   "resamples test cases only, not run-to-run variation)")
        lines.append(f"- labeled {st['labeled_amount']}, {st['kind']}: Dice Δ {100 * st['dice_delta']:+.2f} "
                     f"[{100 * st['dice_ci'][0]:+.2f}, {100 * st['dice_ci'][1]:+.2f}], p {_p(st['p_bootstrap'])}: "
                     f"{verdict}")
    return lines + [""]


def control_warning(res: Results, status: List[dict]) -> List[str]:
    def where(rows):
        return "; ".join(f"labeled {st['labeled_amount']} {st['kind']}: Δ {100 * st['dice_delta']:+.2f} "
                         f"[{100 * st['dice_ci'][0]:+.2f}, {100 * st['dice_ci'][1]:+.2f}]" for st in rows)

    bad = [st for st in status if not st["matches_plain"] and st["conclusive"]]
    single = [st for st in status if not st["matches_plain"] and not st["conclusive"]]
    lines = []
    if bad:
        lines += [f"> **WARNING: the A/A control `{res.control}` does not match plain nnU-Net within the bootstrap "
                  f"CI ({where(bad)}). The glue has a defect: the semi-supervised trainers' numbers below are not "
                  f"trustworthy until it is found.**", ""]
    if single:
        lines += [f"> Note: the A/A control `{res.control}` differs from plain nnU-Net at one seed ({where(single)}). "
                  f"With one seed the bootstrap resamples test cases only, so two runs of the same method can "
                  f"differ this much by run-to-run variation alone; the check is conclusive with two or more "
                  f"seeds. If it still differs then, the glue has a defect.", ""]
    return lines


def presence_rows(res: Results) -> List[dict]:
    rows = []
    for amount in res.amounts:
        for trainer in res.trainers():
            for kind in KINDS:
                if not res.has(trainer, amount, kind):
                    continue
                pres = res.class_presence(trainer, amount, kind)
                fracs = [f for f, n in pres.values() if n]
                rows.append({"trainer": trainer, "labeled_amount": amount, "kind": kind,
                             "fractions": {res.label_names[lab]: f for lab, (f, n) in pres.items()},
                             "frames": {res.label_names[lab]: n for lab, (f, n) in pres.items()},
                             "min_fraction": min(fracs) if fracs else math.nan,
                             "ok": bool(fracs) and min(fracs) >= CLASS_PRESENCE_MIN})
    return rows


def presence_section(res: Results, rows: List[dict]) -> List[str]:
    names = [res.label_names[c] for c in res.classes]
    lines = [f"Share of test frames (pooled over seeds) in which the prediction contains the class, among the "
             f"frames whose reference contains it. Target: ≥ {100 * CLASS_PRESENCE_MIN:.0f} % for every class.", "",
             "| labeled | trainer | predictions | " + " | ".join(names) + " | no class lost |",
             "|---|---|---|" + "---|" * len(names) + "---|"]
    for r in rows:
        cells = ["–" if math.isnan(r["fractions"][n]) else f"{100 * r['fractions'][n]:.0f} %" for n in names]
        lines.append(f"| {r['labeled_amount']} | {r['trainer']} | {r['kind']} | " + " | ".join(cells) + " | "
                     + ("yes" if r["ok"] else "**NO**") + " |")
    lost = sorted({(r["trainer"], r["labeled_amount"]) for r in rows if not r["ok"] and r["kind"] == "raw"})
    if lost:
        lines += ["", "**Classes lost** (raw predictions): " + ", ".join(f"{t} at labeled {a}" for t, a in lost)
                  + "."]
    return lines + [""]


def islands_section(res: Results) -> List[str]:
    if not res.islands:
        return ["No test predictions to inspect (run folders without `test_predictions/`).", ""]
    names = [res.label_names[c] for c in res.classes]
    lines = ["Raw test predictions, before postprocessing: per class, the mean number of connected components "
             "per case (1 = a single blob) / the share of the class' predicted voxels outside its largest "
             "component (the stray islands that keeping the largest component removes). Mean over seeds.", "",
             "| trainer | labeled | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for amount in res.amounts:
        for trainer in res.trainers():
            m = res.island_means(trainer, amount)
            if m:
                cells = [f"{m[c]['components']:.1f} / {100 * m[c]['outside_largest']:.1f} %"
                         if not math.isnan(m[c]['outside_largest']) else f"{m[c]['components']:.1f} / –"
                         for c in res.classes]
                lines.append(f"| {trainer} | {amount} | " + " | ".join(cells) + " |")
    return lines + [""]


#: the semi-supervised signal is summarised over the last epochs of each run (probe values are one step each)
SIGNAL_TAIL_EPOCHS = 5


def log_series(log: dict, key: str) -> np.ndarray:
    """A logged per-epoch series as floats (non-numbers as NaN)."""
    return np.asarray([x if isinstance(x, (int, float)) else np.nan for x in log.get(key, [])], dtype=float)


def log_ratio(log: dict, num: str, den: str) -> np.ndarray:
    """num / den epoch by epoch, NaN where either is not finite or den <= 0; empty if the series' lengths differ."""
    a, b = log_series(log, num), log_series(log, den)
    if a.size != b.size:
        return np.zeros(0)
    ok = np.isfinite(a) & np.isfinite(b) & (b > 0)
    return np.where(ok, a / np.where(ok, b, 1.0), np.nan)


def _seed_mean(series: List[np.ndarray], per_run=np.mean, n: int = SIGNAL_TAIL_EPOCHS) -> float:
    """Mean over runs of ``per_run`` (np.mean, np.median) of each run's finite values among its last ``n`` epochs;
    NaN if no run has any."""
    tails = [v[-n:][np.isfinite(v[-n:])] for v in series]
    vals = [float(per_run(v)) for v in tails if v.size]
    return float(np.mean(vals)) if vals else math.nan


def signal_rows(res: Results) -> List[dict]:
    """Per semi-supervised trainer and amount, from the runs' training logs (curves.json), last epochs:
    each term's weighted gradient norm over the supervised one (median over epochs), the pseudo-label share of
    each foreground class over its labeled share, the gate's kept fraction and the teacher's confidence; means
    over seeds. What a loss that does nothing, or a teacher that loses a class, looks like in numbers."""
    rows = []
    for amount in res.amounts:
        for trainer in res.trainers():
            logs = [res.curves[k] for k in sorted(res.curves, key=str) if k[:2] == (trainer, amount)]
            if trainer == PLAIN or not logs:
                continue
            terms = sorted({k[len("ssl_gradnorm_"):] for log in logs for k in log if k.startswith("ssl_gradnorm_")}
                           - {"sup", "total"})
            grad = {t: _seed_mean([log_ratio(log, f"ssl_gradnorm_{t}", "ssl_gradnorm_sup") for log in logs], np.median)
                    for t in terms}
            share = {res.label_names[c]: _seed_mean([log_ratio(log, f"ssl_pl_share_c{c}", f"ssl_labeled_share_c{c}")
                                                     for log in logs]) for c in res.classes}
            rows.append({"trainer": trainer, "labeled_amount": amount, "seeds": len(logs),
                         "gradient_vs_supervised": grad, "pseudo_label_share_vs_labeled": share,
                         "kept_by_gate": _seed_mean([log_series(log, "ssl_pl_kept") for log in logs]),
                         "teacher_confidence": _seed_mean([log_series(log, "ssl_pl_confidence") for log in logs])})
    return rows


def signal_section(res: Results, rows: List[dict]) -> List[str]:
    if not rows:
        return ["No training logs of semi-supervised runs (curves.json) to summarise.", ""]
    names = [res.label_names[c] for c in res.classes]
    lines = [f"How strong the semi-supervised signal was, from each run's training log over its last "
             f"{SIGNAL_TAIL_EPOCHS} epochs, mean over seeds. *Gradient*: each term's weighted gradient norm over the "
             "supervised loss's, probed on the first step of an epoch (median over the epochs); a term far below "
             "0.1 barely moves the network, whatever its loss value. *Pseudo / labeled share*: the share of "
             "unlabeled voxels the pseudo-label source (the teacher, or the network itself without one) gives a "
             "class over that class' share of the labeled patches (about 1: the class is kept; below 0.1 for 3 "
             "epochs is the trainers' collapse warning; the labeled share is inflated by nnU-Net's foreground "
             "oversampling). *Kept*: voxels passing the confidence gate. Per epoch: the `ssl_*` panels of "
             "each run's progress.png and the pseudo_labels plots below.", "",
             "| trainer | labeled | gradient / supervised | pseudo / labeled share (" + " / ".join(names)
             + ") | kept | confidence |", "|---|---|---|---|---|---|"]

    def num(x, fmt):
        return "–" if _none(x) is None else format(x, fmt)

    for r in rows:
        grad = ", ".join(f"{t} {num(v, '.3f')}" for t, v in r["gradient_vs_supervised"].items()) or "–"
        share = " / ".join(num(r["pseudo_label_share_vs_labeled"][n], ".2f") for n in names)
        lines.append(f"| {r['trainer']} | {r['labeled_amount']} | {grad} | {share} | {num(r['kept_by_gate'], '.2f')} "
                     f"| {num(r['teacher_confidence'], '.3f')} |")
    return lines + [""]


def postprocessing_section(res: Results) -> List[str]:
    lines = ["nnU-Net's `determine_postprocessing` (as `nnUNetv2_determine_postprocessing`) on each run's own "
             "validation predictions: keep only the largest foreground component, then the largest component per "
             "class, each step kept only if it raises the validation Dice. The chosen steps are applied to that "
             "run's test predictions, the same procedure for every trainer.", "",
             "| trainer | labeled | seed | chosen steps | validation Dice before → after |", "|---|---|---|---|---|"]
    for key in sorted(res.pp_status, key=lambda k: (res.amounts.index(k[1]), res.trainers().index(k[0]), k[2])):
        st = res.pp_status[key]
        if not st.get("available"):
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | **missing**: {st.get('reason', '')} | – |")
            continue
        steps = "; ".join(_step_txt(x, res.label_names) for x in st.get("steps", [])) or "none (nothing improved)"
        before, after = st.get("validation_dice_before"), st.get("validation_dice_after")
        val = f"{100 * before:.1f} → {100 * after:.1f}" if before is not None and after is not None else "–"
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {steps} | {val} |")
    return lines + [""]


def _step_txt(step: dict, names: Dict[str, str]) -> str:
    labels = step.get("kwargs", {}).get("labels_or_regions")
    labels = labels if isinstance(labels, list) else [labels]
    what = ", ".join(names.get(str(x), str(x)) for x in labels)
    return f"largest component of {what}" if step.get("function", "").startswith("remove_all_but_largest") else \
        f"{step.get('function')}({what})"


def cost_section(res: Results) -> List[str]:
    lines = ["| trainer | s/epoch (median) | s/iteration | vs plain | peak memory MB | validation Dice (nnU-Net, val "
             "cases) |", "|---|---|---|---|---|---|"]
    plain = [i.get("seconds_per_epoch_median") for k, i in res.info.items() if k[0] == PLAIN]
    plain_s = float(np.median([p for p in plain if p])) if any(plain) else math.nan
    for trainer in res.trainers():
        infos = [i for k, i in res.info.items() if k[0] == trainer]
        s = [i.get("seconds_per_epoch_median") for i in infos if i.get("seconds_per_epoch_median")]
        mem = [i.get("peak_memory_mb") for i in infos if i.get("peak_memory_mb") is not None]
        val = [i.get("validation_foreground_dice") for i in infos if i.get("validation_foreground_dice") is not None]
        if not s:
            continue
        sec = float(np.median(s))
        mem_txt = f"{np.median(mem):.0f}" if mem else "–"
        val_txt = f"{100 * np.mean(val):.1f}" if val else "–"
        lines.append(f"| {trainer} | {sec:.1f} | {sec / res.spec.iterations_per_epoch:.3f} | {sec / plain_s:.2f}x | "
                     f"{mem_txt} | {val_txt} |")
    return lines + [""]


def summary_json(res: Results, comp: Dict[tuple, Optional[dict]], control: List[dict],
                 presence: List[dict]) -> dict:
    """The machine-readable report (summary.json). Dice values are fractions (x100 = points), HD95 in mm."""
    spec = res.spec
    steps = spec.epochs * spec.iterations_per_epoch
    rows = []
    for amount in res.amounts:
        for trainer in res.trainers():
            if trainer == PLAIN or not res.has(trainer, amount):
                continue
            row = {"trainer": trainer, "labeled_amount": amount, "is_control": trainer == res.control,
                   "seeds": sorted(k[2] for k in res.cases if k[:2] == (trainer, amount)),
                   "total_steps_per_run": steps,
                   "validation_dice": _none(res.validation_dice(trainer, amount)),
                   "plain_validation_dice": _none(res.validation_dice(PLAIN, amount)),
                   "s_per_step": _none(res.seconds_per_step(trainer, amount)),
                   "s_per_step_vs_plain": _none(res.seconds_per_step(trainer, amount)
                                                / res.seconds_per_step(PLAIN, amount))}
            for kind in KINDS:
                c = comp[(trainer, amount, kind)]
                if c is None:
                    row[kind] = {"missing": "no post-processed metrics for this trainer or plain" if
                                 kind == "postprocessed" else "no paired plain run"}
                    continue
                d, h = c["dice"], c["hd95"]
                row[kind] = {
                    "seeds": c["seeds"], "n_pairs": c["n_pairs"], "dice_delta": d.delta,
                    "dice_ci95": [d.ci_low, d.ci_high], "p_bootstrap": d.p, "p_wilcoxon": _none(c["p_wilcoxon"]),
                    "wins": c["wins"], "losses": c["losses"],
                    "hd95_delta": h.delta if h else None, "hd95_ci95": [h.ci_low, h.ci_high] if h else None,
                    "hd95_p_bootstrap": h.p if h else None,
                    "seed_spread": c["seed_spread"],
                    "per_class_dice": {res.label_names[lab]: ({"delta": b.delta, "ci95": [b.ci_low, b.ci_high],
                                                               "p_bootstrap": b.p} if b else None)
                                       for lab, b in c["per_class_dice"].items()}}
            rows.append(row)
    means = {f"{t}|{a}": {k: {m: res.summary(t, a, "fg", m, k) for m in METRICS} for k in KINDS}
             for t in res.trainers() for a in res.amounts}
    return {
        "benchmark": spec.name, "dataset": spec.dataset, "configuration": spec.configuration, "plans": spec.plans,
        "device": spec.device, "precision": spec.precision, "checkpoint": spec.checkpoint,
        "test_time_mirroring": spec.test_time_mirroring,
        "epochs": spec.epochs, "iterations_per_epoch": spec.iterations_per_epoch, "total_steps_per_run": steps,
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
        "runs": {"finished": len(res.cases), "total": len(res.runs), "planned": res.planned,
                 "without_postprocessing": [{"trainer": t, "labeled_amount": a, "seed": s, "reason": r}
                                            for t, a, s, r in res.missing_postprocessing()]},
        "means": means,
        "validation_ranking": {a: _validation_ranking(res, a) for a in res.amounts},
        "islands": {f"{t}|{a}": {res.label_names[c]: v for c, v in m.items()}
                    for t in res.trainers() for a in res.amounts if (m := res.island_means(t, a))},
    }


def _validation_ranking(res: Results, amount: str) -> List[dict]:
    """Semi-supervised trainers (control excluded) by nnU-Net's validation Dice, best first: how the
    screening chooses what to confirm, on the fold's validation cases only."""
    rows = [{"trainer": t, "validation_dice": res.validation_dice(t, amount)} for t in res.trainers()
            if t not in (PLAIN, res.control) and res.has(t, amount)]
    rows = [r for r in rows if not math.isnan(r["validation_dice"])]
    return sorted(rows, key=lambda r: -r["validation_dice"])


def _none(x):
    """NaN -> None for JSON."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


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
    done, total = len(res.cases), res.planned
    comp = comparisons(res)
    control = control_status(res, comp)
    presence = presence_rows(res)
    from nnunet_proto.benchmark.plots import plots

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
    if spec.notes:
        lines += [spec.notes, ""]
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
    lines += ["## A/A control", ""] + control_section(res, control)
    lines += ["## Run-to-run spread and power", ""] + spread_section(res, comp)
    agreement = validation_agreement(res)
    lines += ["## Validation as a guide", ""] + validation_agreement_section(agreement)
    lines += ["## No class lost", ""] + presence_section(res, presence)
    lines += ["## Test results", ""] + tables(res)
    lines += ["## Test results after nnU-Net's postprocessing", ""] + tables(res, "postprocessed", ("Dice", "HD95"))
    lines += ["## Stray islands", ""] + islands_section(res)
    signal = signal_rows(res)
    lines += ["## Semi-supervised signal", ""] + signal_section(res, signal)
    lines += ["## Postprocessing", ""] + postprocessing_section(res)
    lines += ["## Cost", "", "Seconds per epoch from nnU-Net's epoch timestamps (training + its validation "
              "iterations), peak memory of the training process. Runs ran one after another on the same machine; "
              "other work on the machine inflates absolute times, compare ratios with care.", ""]
    lines += cost_section(res)
    lines += ["## Plots", ""] + [f"![{f}]({f})" for f in images] + [""]
    lines += ["## Reproduce", "", "With the same nnU-Net folders exported (the dataset converted, planned and "
              "preprocessed as in its notes), this command trains whatever runs are missing and rewrites the "
              "report; add `--report-only` to rewrite it from the finished runs only.", "",
              "```", portable(spec.extra.get("command", "(command not recorded)")), "```", ""]
    out = report_dir / "README.md"
    out.write_text("\n".join(lines))
    summary = summary_json(res, comp, control, presence)
    summary["semi_supervised_signal"] = {"tail_epochs": SIGNAL_TAIL_EPOCHS, "rows": signal}
    summary["validation_agreement"] = agreement
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

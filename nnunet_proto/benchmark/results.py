"""A benchmark's finished runs as report rows: per-case metrics, raw and post-processed, and what is derived from them.

A *row* is what the report compares with plain nnU-Net. It is a trainer (``nnUNetTrainerCPCL``), plain nnU-Net
trained for more steps (the equal-compute row, ``nnUNetTrainer@x2.3``), or the EMA teacher of a teacher-student
run evaluated on its own (``nnUNetTrainerCPCL@teacher``). Every row is paired with plain nnU-Net run on the same
fold and seed, on the same test cases.

Statistics:
* per run, each metric is averaged over the test cases (undefined values excluded, see docs/evaluation.md);
* per row and labeled amount, the mean over seeds of those per-run means, ± the standard deviation over seeds
  when there are several seeds, else ± the standard deviation over test cases;
* against plain nnU-Net: Δ with a 95 % CI and a two-sided p from a hierarchical bootstrap over seeds, then test
  cases (stats.py); the Wilcoxon signed-rank p over the pooled (case, seed) pairs for reference; wins/losses;
  HD95 Δ; per-class Dice Δ; each seed's Δ with the seed-level t-test and the seeds a 3-point effect needs.

Nothing here writes a file or formats text: ``sections.py`` and ``signal.py`` turn it into report sections,
``plots.py`` into figures, ``report.py`` into README.md and summary.json.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from nnunet_proto.benchmark.lookup import trainer_warm_starts
from nnunet_proto.benchmark.records import (
    IMPORTED_FILE,
    VALIDATION_SUMMARY,
    epoch_durations,
    prediction_islands,
    validation_islands,
)
from nnunet_proto.benchmark.spec import (
    CONTROL,
    PLAIN,
    STEPS_MARK,
    TEACHER_DONE_FILE,
    TEACHER_MARK,
    BenchmarkSpec,
    Run,
    is_self_training,
    load_runs,
    teacher_row,
)
from nnunet_proto.benchmark.stats import (
    TARGET_EFFECT,
    BootstrapResult,
    hierarchical_bootstrap,
    seed_t_test_p,
    seeds_for_power,
    wilcoxon_p,
)
from nnunet_proto.evaluation.metrics import RULE_BOTH_PRESENT as RULE_PRESENT
from nnunet_proto.evaluation.metrics import RULE_PREDICTION_EMPTY as RULE_PRED_EMPTY

METRICS = ("Dice", "IoU", "HD95", "ASD")
HIGHER_IS_BETTER = {"Dice": True, "IoU": True, "HD95": False, "ASD": False}
KINDS = ("raw", "postprocessed")
KIND_TITLE = {"raw": "raw predictions", "postprocessed": "after nnU-Net's postprocessing"}
CLASS_PRESENCE_MIN = 0.95  # "no class lost": each class predicted in >= 95 % of the frames that contain it
OLD_RUN_REASON = ("postprocessing stage not run (finished by an older version of the benchmark); re-run the "
                  "benchmark command to complete it without retraining")


#: a run's pace (``Results.run_pace``) is this percentile of its epoch times
PACE_PERCENTILE = 10


def split_row(row: str) -> tuple:
    """(trainer, steps factor, is the EMA teacher) of a row name."""
    teacher = row.endswith(TEACHER_MARK)
    base = row[: -len(TEACHER_MARK)] if teacher else row
    trainer, _, factor = base.partition(STEPS_MARK)
    return trainer, float(factor) if factor else 1.0, teacher


def is_trainer_row(row: str) -> bool:
    """A row that is a trainer as trained (a ``-tr`` argument): no EMA-teacher or equal-compute mark."""
    return split_row(row) == (row, 1.0, False)


def short_name(row: str) -> str:
    """A row for tables and plots: the trainer without the ``nnUNetTrainer`` prefix (plain nnU-Net: "plain"),
    ``plain ×2.3 steps`` for the equal-compute row, ``CPCL (EMA teacher)`` for a teacher row."""
    trainer, factor, teacher = split_row(row)
    name = trainer.replace("nnUNetTrainer", "") or "plain"
    if factor != 1.0:
        name += f" ×{factor:g} steps"
    return name + (" (EMA teacher)" if teacher else "")


def display_name(row: str) -> str:
    """A row with its full trainer name, as in the tables (``nnUNetTrainer ×2.3 steps (equal compute)``)."""
    trainer, factor, teacher = split_row(row)
    if factor != 1.0:
        return f"{trainer} ×{factor:g} steps (equal compute)"
    return f"{trainer}, EMA teacher" if teacher else trainer


def nanmean(values) -> float:
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
        per_label["fg"] = {m: nanmean([per_label[lab][m] for lab in entry["metrics"]]) for m in METRICS}
        out[entry["case"]] = per_label
    return out


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


def maybe_bootstrap(diffs: Dict[int, np.ndarray]) -> Optional[BootstrapResult]:
    values = [d for d in diffs.values() if not np.isnan(d).all()]
    return hierarchical_bootstrap(values) if values else None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


class Results:
    """All finished runs of a benchmark, indexed by (row, amount, seed), raw and post-processed."""

    def __init__(self, spec: BenchmarkSpec, results_root: Path):
        self.spec = spec
        self.runs: List[Run] = load_runs(results_root / "runs.json")
        # every run the spec asks for (plain, control, trainers, equal compute x amounts x seeds) plus any other
        # registered one (an earlier invocation's), so that a report of an unfinished benchmark says how much is
        # still to come
        planned = {(r.row, str(a), int(s)) for a in spec.amounts for s in spec.seeds for r in spec.runs_of(a, s, 0)}
        self.planned = len(planned | {(r.row, str(r.amount), int(r.seed)) for r in self.runs})
        self.cases_by_kind: Dict[str, Dict[tuple, dict]] = {k: {} for k in KINDS}
        self.cases = self.cases_by_kind["raw"]
        self.pp_status: Dict[tuple, dict] = {}
        self.info: Dict[tuple, dict] = {}
        self.curves: Dict[tuple, dict] = {}
        self.label_names: Dict[str, str] = {}
        self.steps_factor: Dict[str, float] = {}
        self.imported: Dict[tuple, dict] = {}  # (row, amount, seed) -> where the run's records came from
        pred_dirs: Dict[tuple, Path] = {}
        run_dirs: Dict[tuple, Path] = {}
        for run in self.runs:
            d = run.dir(results_root / "runs")
            if not (d / "metrics.json").is_file():
                continue
            key = (run.row, run.amount, run.seed)
            self.steps_factor[run.row] = run.steps_factor
            info = _read_json(d / "run_info.json")
            if (d / VALIDATION_SUMMARY).is_file():  # nnU-Net's validation summary kept with the run's records
                info["validation_summary"] = str(d / VALIDATION_SUMMARY)
            if (d / IMPORTED_FILE).is_file():  # trained on another machine (records.import_runs)
                self.imported[key] = _read_json(d / IMPORTED_FILE)
            self._add(key, d / "metrics.json", d / "metrics_postprocessed.json",
                      _read_json(d / "postprocessing.json") if (d / "postprocessing.json").is_file()
                      else {"available": False, "reason": OLD_RUN_REASON}, d, info)
            pred_dirs[key] = d / "test_predictions"
            run_dirs[key] = d
            if (d / "curves.json").is_file():
                self.curves[key] = json.loads((d / "curves.json").read_text())
            if (d / TEACHER_DONE_FILE).is_file() and (d / "metrics_teacher.json").is_file():
                tkey = (teacher_row(run.row), run.amount, run.seed)
                status = _read_json(d / TEACHER_DONE_FILE)
                self.steps_factor[tkey[0]] = run.steps_factor
                self._add(tkey, d / "metrics_teacher.json", d / "metrics_teacher_postprocessed.json", status, d,
                          {**info, "validation_foreground_dice": status.get("validation_foreground_dice")})
                pred_dirs[tkey] = d / "test_predictions_teacher"
        self.classes = sorted(self.label_names, key=int)
        self.islands: Dict[tuple, dict] = {}  # raw test predictions' stray islands, per run (cached in the run dir)
        for key, pred in pred_dirs.items():
            islands = prediction_islands(pred, [int(c) for c in self.classes])
            if islands is not None:  # None: predictions deleted to save space (the section says so)
                self.islands[key] = islands["mean"]
        # the same on the final validation predictions (the fold's validation cases, what a screening reads)
        self.validation_islands: Dict[tuple, dict] = {}
        for key, d in run_dirs.items():
            islands = validation_islands(d, [int(c) for c in self.classes])
            if islands is not None:
                self.validation_islands[key] = islands["mean"]
        self.labels = self.classes + ["fg"]
        self.label_names["fg"] = "mean"
        # runs.json accumulates every invocation of this benchmark (more seeds or trainers later)
        self.seeds = sorted({r.seed for r in self.runs})
        self.amounts = list(dict.fromkeys(r.amount for r in self.runs))
        # the A/A control of this invocation, or of an earlier one whose runs are part of the benchmark
        self.control: Optional[str] = spec.control or (CONTROL if any(r.trainer == CONTROL for r in self.runs)
                                                       else None)

    def _add(self, key: tuple, metrics_file: Path, pp_file: Path, status: dict, run_dir: Path, info: dict) -> None:
        metrics = json.loads(metrics_file.read_text())
        self.cases[key] = case_table(metrics)
        self.label_names.update({lab: v.get("name", lab) for lab, v in metrics["mean"].items()})
        if status.get("available") and pp_file.is_file():
            self.cases_by_kind["postprocessed"][key] = case_table(json.loads(pp_file.read_text()))
        elif status.get("available"):
            status = {"available": False, "reason": f"{pp_file.name} missing in {run_dir}"}
        self.pp_status[key] = status
        self.info[key] = info

    def finished_runs(self) -> int:
        """Runs with test metrics (an EMA teacher's row is part of its run, not a run of its own)."""
        return sum(1 for key in self.cases if not split_row(key[0])[2])

    def trainers(self) -> List[str]:
        """The rows with results, in report order: plain, the control, each trainer followed by its EMA teacher,
        then rows of earlier invocations, then plain at equal compute."""
        order = [PLAIN]
        for t in [*self.spec.all_trainers, *(r.trainer for r in self.runs)]:
            order += [t, teacher_row(t)]
        order += [r.row for r in self.runs] + sorted({k[0] for k in self.cases})
        order = list(dict.fromkeys(order))
        order.sort(key=lambda row: split_row(row)[1] != 1.0)  # stable: equal-compute rows last
        return [t for t in order if any(k[0] == t for k in self.cases)]

    def steps(self, row: str) -> int:
        """Training steps of one run of ``row`` (the teacher's training not included)."""
        return int(round(self.spec.epochs * self.steps_factor.get(row, 1.0))) * self.spec.iterations_per_epoch

    def has(self, trainer: str, amount: str, kind: str = "raw") -> bool:
        return any(k[:2] == (trainer, amount) for k in self.cases_by_kind[kind])

    def run_means(self, trainer: str, amount: str, label: str, metric: str, kind: str = "raw") -> List[float]:
        return [self.run_means_for((trainer, amount, s), kind, label, metric)
                for s in self.seeds if (trainer, amount, s) in self.cases_by_kind[kind]]

    def run_means_for(self, key: tuple, kind: str = "raw", label: str = "fg", metric: str = "Dice") -> float:
        """One run's (row, amount, seed) mean over its test cases; NaN when the run has no such metrics."""
        cases = self.cases_by_kind[kind].get(key)
        return nanmean([c[label][metric] for c in cases.values()]) if cases else math.nan

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
                         kind: str = "raw", reference: str = PLAIN) -> Dict[int, np.ndarray]:
        """{seed: row − reference row (plain nnU-Net) per test case (sorted case ids, NaN where undefined)} for
        the seeds where both ran (same fold, same test cases)."""
        cases = self.cases_by_kind[kind]
        out = {}
        for s in self.seeds:
            a, b = cases.get((trainer, amount, s)), cases.get((reference, amount, s))
            if a is None or b is None:
                continue
            common = sorted(set(a) & set(b))
            if common:
                out[s] = np.array([a[c][label][metric] - b[c][label][metric] for c in common], dtype=float)
        return out

    def paired(self, trainer: str, amount: str, metric: str = "Dice", label: str = "fg",
               kind: str = "raw") -> Optional[dict]:
        """Wilcoxon signed-rank test of a row vs plain nnU-Net on the pooled (case, seed) pairs."""
        diffs = self.seed_differences(trainer, amount, metric, label, kind)
        diff = np.concatenate(list(diffs.values())) if diffs else np.zeros(0)
        diff = diff[~np.isnan(diff)]
        if diff.size < 2:
            return None
        better = (diff > 0) if HIGHER_IS_BETTER[metric] else (diff < 0)
        worse = (diff < 0) if HIGHER_IS_BETTER[metric] else (diff > 0)
        return {"n": int(diff.size), "mean_diff": float(diff.mean()), "median_diff": float(np.median(diff)),
                "p": wilcoxon_p(diff), "wins": int(better.sum()), "losses": int(worse.sum())}

    def _infos(self, trainer: str, amount: Optional[str] = None) -> List[dict]:
        return [i for k, i in self.info.items() if k[0] == trainer and (amount is None or k[1] == amount)]

    def seconds_per_step(self, trainer: str, amount: str) -> float:
        """Seconds per training iteration at the row's pace among its runs at this amount (``epoch_seconds``)."""
        return self.epoch_seconds(trainer, amount) / self.spec.iterations_per_epoch

    def run_pace(self, key: tuple) -> float:
        """One run's seconds per epoch at its own pace: the ``PACE_PERCENTILE``th percentile of its epoch times
        (nnU-Net's epoch timestamps, every epoch of a resumed run included). Every epoch does the same work, and
        other work on the machine only ever slows an epoch, so the run's fast epochs are its own cost: a run that
        shared its cores for most of its epochs still has its pace where a tenth of them ran alone, and the first
        epoch's start-up or an epoch that spans a pause do not count. Runs without training curves fall back to
        their recorded median."""
        secs = [d for d in epoch_durations(self.curves.get(key, {})) if d > 0]
        if secs:
            return float(np.percentile(secs, PACE_PERCENTILE))
        median = self.info.get(key, {}).get("seconds_per_epoch_median")
        return float(median) if median else math.nan

    def epoch_seconds(self, row: str, amount: Optional[str] = None) -> float:
        """The row's pace: the fastest of its runs' paces (``run_pace``; all amounts and seeds), by the same
        reasoning (a run slowed throughout does not move it while another ran alone). Plain's pace is the
        fastest of plain's runs and of its equal-compute rows' (the same trainer, the same work per epoch). An EMA
        teacher's row has its student's pace (the same run). ``amount``: only the runs at that labeled amount."""
        rows = self._pace_rows(row)
        v = [self.run_pace(k) for k in self.info if k[0] in rows and (amount is None or k[1] == amount)]
        v = [x for x in v if math.isfinite(x)]
        return float(min(v)) if v else math.nan

    def _pace_rows(self, row: str) -> set:
        """The rows whose runs set ``row``'s pace (``epoch_seconds``)."""
        rows = {row[: -len(TEACHER_MARK)] if split_row(row)[2] else row}
        if row == PLAIN:
            rows |= {k[0] for k in self.info if split_row(k[0])[0] == PLAIN and not split_row(k[0])[2]}
        return rows

    def pace_machines(self, row: str) -> List[Optional[str]]:
        """``training_machines`` of every row that sets ``row``'s pace (plain: its equal-compute rows too)."""
        out: List[Optional[str]] = []
        for r in sorted(self._pace_rows(row), key=lambda r: r != row):
            out += [m for m in self.training_machines(r) if m not in out]
        return out

    def pseudo_label_seconds(self, key: tuple) -> float:
        """Seconds one run's teacher took to pseudo-label the whole pool: the run's pseudo-labeling wall time,
        scaled from the cases it predicted to all of them (a resumed run predicted only the rest). NaN where the
        run predicted none: it reused labels an earlier run had made, and its wall time is not their cost."""
        i = self.info.get(key, {})
        wall, done, total = (i.get(k) for k in ("pseudo_label_wall_s", "pseudo_labels_predicted", "pseudo_labels"))
        if wall is None or not done or not total:
            return math.nan
        return float(wall) * total / done

    def training_machines(self, row: str) -> List[Optional[str]]:
        """Each machine that trained a run of the row, once, in order of first appearance; None for runs that
        recorded none (older versions)."""
        out: List[Optional[str]] = []
        for info in self._infos(row):
            for m in info.get("training_machines") or [None]:
                if m not in out:
                    out.append(m)
        return out

    def warm_started(self, row: str) -> bool:
        """Whether the row's runs start from the plain run of their fold: ``warm_start_from`` in run_info, or a
        trainer that always does (``lookup.trainer_warm_starts``: a run resumed before run_one kept the record in
        warm_start.json lost it, and its cost must still count plain's training)."""
        if any(i.get("warm_start_from") for k, i in self.info.items() if k[0] == row):
            return True
        trainer, factor, _ = split_row(row)
        if trainer in (PLAIN, CONTROL) or factor != 1.0 or not any(k[0] == row for k in self.info):
            return False
        return trainer_warm_starts(trainer)

    def total_cost(self, trainer: str, amount: str) -> Dict[str, float]:
        """What one run of the row costs, relative to one plain run: training steps (the self-training student
        and a warm-started run count plain's too: the teacher, the warm start) and seconds. Seconds are each row's
        pace (``epoch_seconds``, its fastest run) x its epochs, plus plain's training for a self-training or
        warm-started row, plus for self-training the fastest of the amount's pseudo-labelings
        (``pseudo_label_seconds``), by the same reasoning."""
        steps_plain = self.steps(PLAIN)
        trainer_name, _, is_teacher = split_row(trainer)
        st = is_self_training(trainer_name) and not is_teacher
        warm = self.warm_started(trainer) and not is_teacher
        steps = self.steps(trainer) + (steps_plain if st or warm else 0)
        per_epoch = self.spec.iterations_per_epoch
        t_plain = self.epoch_seconds(PLAIN) * steps_plain / per_epoch
        total = self.epoch_seconds(trainer) * self.steps(trainer) / per_epoch + (t_plain if st or warm else 0.0)
        pl = [self.pseudo_label_seconds(k) for k in self.info if k[:2] == (trainer, amount)] if st else []
        pl = [x for x in pl if math.isfinite(x)]
        label_s = float(min(pl)) if pl else (math.nan if st else 0.0)
        ok = self.has(trainer, amount) and math.isfinite(t_plain) and t_plain > 0
        return {"steps": steps, "steps_vs_plain": steps / steps_plain,
                "seconds_vs_plain": (total + label_s) / t_plain if ok else math.nan,
                "pseudo_label_seconds": label_s if st else math.nan}

    def validation_dice(self, trainer: str, amount: str) -> float:
        """Mean over the row's runs at this amount of nnU-Net's foreground Dice on the fold's validation
        cases (the number to choose trainers and defaults on; never the test cases)."""
        v = [i.get("validation_foreground_dice") for i in self._infos(trainer, amount)]
        v = [x for x in v if x is not None]
        return float(np.mean(v)) if v else math.nan

    def island_means(self, trainer: str, amount: str, validation: bool = False) -> Dict[str, Dict[str, float]]:
        """Per class, the mean over seeds of each run's mean components per case and share outside the largest:
        raw test predictions, or the final validation predictions (``validation``)."""
        islands = self.validation_islands if validation else self.islands
        runs = [v for k, v in islands.items() if k[:2] == (trainer, amount)]
        return {c: {m: nanmean([r[c][m] for r in runs]) for m in ("components", "outside_largest")}
                for c in self.classes} if runs else {}

    def compare(self, trainer: str, amount: str, kind: str = "raw", reference: str = PLAIN) -> Optional[dict]:
        """Every paired statistic of one row against the reference row (plain nnU-Net) at one labeled amount,
        or None without pairs."""
        dice = self.seed_differences(trainer, amount, "Dice", "fg", kind, reference)
        if not dice or all(np.isnan(d).all() for d in dice.values()):
            return None
        boot = hierarchical_bootstrap(list(dice.values()))
        pooled = np.concatenate(list(dice.values()))
        pooled = pooled[~np.isnan(pooled)]
        hd = self.seed_differences(trainer, amount, "HD95", "fg", kind, reference)
        hd_boot = maybe_bootstrap(hd)
        per_class = {lab: maybe_bootstrap(self.seed_differences(trainer, amount, "Dice", lab, kind, reference))
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
        """[(row, amount, seed, reason)] of finished runs without post-processed metrics."""
        return [(*k, self.pp_status[k].get("reason", "unknown")) for k in self.cases
                if k not in self.cases_by_kind["postprocessed"]]


def comparisons(res: Results) -> Dict[tuple, Optional[dict]]:
    """{(row, amount, kind): Results.compare(...)} for every row except plain."""
    return {(t, a, k): res.compare(t, a, k) for a in res.amounts for t in res.trainers() if t != PLAIN
            for k in KINDS}

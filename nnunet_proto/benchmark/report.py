"""The benchmark report: tables (mean ± sd), paired tests against plain nnU-Net, plots, cost per trainer.

Statistics:
* per run, each metric is averaged over the test cases (undefined values excluded, see docs/evaluation.md);
* the table shows, per trainer and labeled amount, the mean over seeds of those per-run means, ± the
  standard deviation over seeds when there are several seeds, else ± the standard deviation over
  test cases (the report says which);
* paired test: two-sided Wilcoxon signed-rank test (scipy) of the per-case foreground-mean Dice (and
  HD95) of a trainer against plain nnU-Net trained on the same fold with the same seed, pooling the
  (case, seed) pairs of all seeds.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from nnunet_proto.benchmark.spec import PLAIN, BenchmarkSpec, Run, load_runs

METRICS = ("Dice", "IoU", "HD95", "ASD")
HIGHER_IS_BETTER = {"Dice": True, "IoU": True, "HD95": False, "ASD": False}


def _nanmean(values) -> float:
    a = np.asarray([v for v in values if v is not None], dtype=float)
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else math.nan


def _nanstd(values) -> float:
    a = np.asarray([v for v in values if v is not None], dtype=float)
    a = a[~np.isnan(a)]
    return float(a.std(ddof=1)) if a.size > 1 else math.nan


def case_table(metrics: dict) -> Dict[str, Dict[str, Dict[str, float]]]:
    """{case: {label or 'fg': {metric: value}}} from an evaluate_folders JSON ('fg' = mean over classes)."""
    out = {}
    for entry in metrics["metric_per_case"]:
        per_label = {lab: {m: (v[m] if v[m] is not None else math.nan) for m in METRICS}
                     for lab, v in entry["metrics"].items()}
        per_label["fg"] = {m: _nanmean([per_label[lab][m] for lab in entry["metrics"]]) for m in METRICS}
        out[entry["case"]] = per_label
    return out


class Results:
    """All finished runs of a benchmark, indexed by (trainer, amount, seed)."""

    def __init__(self, spec: BenchmarkSpec, results_root: Path):
        self.spec = spec
        self.runs: List[Run] = load_runs(results_root / "runs.json")
        self.cases: Dict[tuple, dict] = {}
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
            self.info[key] = json.loads((d / "run_info.json").read_text()) if (d / "run_info.json").is_file() else {}
            if (d / "curves.json").is_file():
                self.curves[key] = json.loads((d / "curves.json").read_text())
        self.labels = sorted(self.label_names, key=int) + ["fg"]
        self.label_names["fg"] = "mean"
        # runs.json accumulates every invocation of this benchmark (more seeds or trainers later)
        self.seeds = sorted({r.seed for r in self.runs})
        self.amounts = list(dict.fromkeys(r.amount for r in self.runs))

    def trainers(self) -> List[str]:
        order = list(dict.fromkeys([PLAIN, *self.spec.all_trainers, *(r.trainer for r in self.runs)]))
        return [t for t in order if any(k[0] == t for k in self.cases)]

    def run_means(self, trainer: str, amount: str, label: str, metric: str) -> List[float]:
        return [_nanmean([c[label][metric] for c in self.cases[(trainer, amount, s)].values()])
                for s in self.seeds if (trainer, amount, s) in self.cases]

    def summary(self, trainer: str, amount: str, label: str, metric: str):
        means = self.run_means(trainer, amount, label, metric)
        if not means:
            return math.nan, math.nan, 0
        if len(means) > 1:
            return float(np.mean(means)), float(np.std(means, ddof=1)), len(means)
        only = self.cases[(trainer, amount, next(s for s in self.seeds if (trainer, amount, s) in self.cases))]
        return means[0], _nanstd([c[label][metric] for c in only.values()]), 1

    def paired(self, trainer: str, amount: str, metric: str = "Dice", label: str = "fg") -> Optional[dict]:
        """Wilcoxon signed-rank test of trainer vs plain nnU-Net on the same (case, seed) pairs."""
        from scipy.stats import wilcoxon

        xs, ys = [], []
        for s in self.seeds:
            a, b = self.cases.get((trainer, amount, s)), self.cases.get((PLAIN, amount, s))
            if a is None or b is None:
                continue
            for case in sorted(set(a) & set(b)):
                x, y = a[case][label][metric], b[case][label][metric]
                if not (math.isnan(x) or math.isnan(y)):
                    xs.append(x)
                    ys.append(y)
        if len(xs) < 2:
            return None
        diff = np.asarray(xs) - np.asarray(ys)
        p = 1.0 if np.allclose(diff, 0) else float(wilcoxon(xs, ys, zero_method="wilcox").pvalue)
        better = (diff > 0) if HIGHER_IS_BETTER[metric] else (diff < 0)
        return {"n": len(xs), "mean_diff": float(diff.mean()), "median_diff": float(np.median(diff)), "p": p,
                "wins": int(better.sum())}


def _fmt(mean: float, sd: float, metric: str) -> str:
    if math.isnan(mean):
        return "–"
    scale, digits = (100.0, 1) if metric in ("Dice", "IoU") else (1.0, 2)
    sd_txt = "" if math.isnan(sd) else f" ± {sd * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f}{sd_txt}"


def tables(res: Results) -> List[str]:
    several = len(res.seeds) > 1
    lines = [f"Values: mean ± sd; sd over {'seeds (of per-run means over test cases)' if several else 'test cases'}. "
             f"Dice and IoU in %, HD95 and ASD in mm.", ""]
    for metric in METRICS:
        lines += [f"### {metric}", "",
                  "| labeled | trainer | " + " | ".join(res.label_names[lab] for lab in res.labels) + " |",
                  "|---|---|" + "---|" * len(res.labels)]
        for amount in res.amounts:
            for trainer in res.trainers():
                n_seeds = res.summary(trainer, amount, "fg", metric)[2]
                if n_seeds == 0:
                    continue
                cells = [_fmt(*res.summary(trainer, amount, lab, metric)[:2], metric) for lab in res.labels]
                mark = "" if n_seeds == len(res.seeds) else f" ({n_seeds} of {len(res.seeds)} seeds)"
                lines.append(f"| {amount} | {trainer}{mark} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def tests_section(res: Results) -> List[str]:
    lines = ["Two-sided Wilcoxon signed-rank test (scipy.stats.wilcoxon) of the per-case foreground-mean value of "
             "each trainer against plain nnU-Net trained on the same labeled cases with the same seed; pairs are "
             "(test case, seed). Δ = trainer − plain (Dice in points, HD95 in mm); wins = cases where the "
             "trainer is better.", "",
             "| labeled | trainer | n pairs | Dice Δ mean | Dice Δ median | Dice wins | Dice p | HD95 Δ mean "
             "| HD95 p |",
             "|---|---|---|---|---|---|---|---|---|"]
    for amount in res.amounts:
        for trainer in res.trainers():
            if trainer == PLAIN:
                continue
            d, h = res.paired(trainer, amount, "Dice"), res.paired(trainer, amount, "HD95")
            if d is None:
                continue
            lines.append(f"| {amount} | {trainer} | {d['n']} | {100 * d['mean_diff']:+.2f} | "
                         f"{100 * d['median_diff']:+.2f} | {d['wins']}/{d['n']} | {d['p']:.3g} | "
                         + (f"{h['mean_diff']:+.2f} | {h['p']:.3g} |" if h else "– | – |"))
    return lines + [""]


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


def _amount_value(amount: str) -> float:
    return float(amount[:-1]) if amount.endswith("%") else float(amount)


def plots(res: Results, out: Path) -> List[str]:
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    files = []
    amounts = list(res.amounts)
    xs = [_amount_value(a) for a in amounts]
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, trainer in enumerate(res.trainers()):
        stats = [res.summary(trainer, a, "fg", "Dice") for a in amounts]
        jitter = (i - len(res.trainers()) / 2) * 0.03 * (max(xs) - min(xs) + 1)
        ax.errorbar([x + jitter for x in xs], [100 * m for m, _, _ in stats],
                    yerr=[100 * (0 if math.isnan(sd) else sd) for _, sd, _ in stats], marker="o", capsize=4,
                    label=trainer)
    ax.set_xlabel("labeled " + ("groups/cases" if not amounts[0].endswith("%") else "%"))
    ax.set_ylabel("test Dice, mean over classes (%)")
    ax.set_xticks(xs)
    ax.set_xticklabels(amounts)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "dice_vs_labeled.png", dpi=110)
    plt.close(fig)
    files.append("dice_vs_labeled.png")

    fig, axes = plt.subplots(1, len(amounts), figsize=(6 * len(amounts), 5), squeeze=False)
    for ax, amount in zip(axes[0], amounts):
        data, names = [], []
        for trainer in res.trainers():
            vals = [c["fg"]["Dice"] * 100 for s in res.seeds if (trainer, amount, s) in res.cases
                    for c in res.cases[(trainer, amount, s)].values() if not math.isnan(c["fg"]["Dice"])]
            data.append(vals)
            names.append(trainer.replace("nnUNetTrainer", "") or "plain")
        ax.boxplot(data, tick_labels=names, showmeans=True)
        ax.set_title(f"labeled {amount}: per-case test Dice")
        ax.set_ylabel("Dice, mean over classes (%)")
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(out / "per_case_dice_boxplot.png", dpi=110)
    plt.close(fig)
    files.append("per_case_dice_boxplot.png")

    for amount in amounts:
        seed = res.seeds[0]
        keys = [(t, amount, seed) for t in res.trainers() if (t, amount, seed) in res.curves]
        if not keys:
            continue
        fig, axes = plt.subplots(len(keys), 1, figsize=(9, 3.2 * len(keys)), squeeze=False)
        for ax, key in zip(axes[:, 0], keys):
            log = res.curves[key]
            x = range(len(log.get("train_losses", [])))
            ax.plot(x, log.get("train_losses", []), label="train loss (total)", lw=2)
            ax.plot(x, log.get("val_losses", []), label="val loss", lw=2)
            for k, v in log.items():
                if k.startswith("ssl_loss_"):
                    ax.plot(range(len(v)), v, ls="--", label=k[4:])
            ax2 = ax.twinx()
            ax2.plot(x, log.get("ema_fg_dice", []), color="g", lw=2, label="pseudo Dice (EMA)")
            ax2.set_ylim(0, 1)
            ax.set_title(f"{key[0]} (labeled {amount}, seed {seed})")
            ax.set_xlabel("epoch")
            ax.legend(fontsize=7, loc="upper left")
            ax2.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        name = f"training_curves_labeled{amount.replace('%', 'pct')}.png"
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        files.append(name)
    return files


def write_report(spec: BenchmarkSpec, results_root: Path, report_dir: Path, failed: Optional[List[str]] = None) -> Path:
    report_dir.mkdir(parents=True, exist_ok=True)
    res = Results(spec, results_root)
    done, total = len(res.cases), len(res.runs)
    images = plots(res, report_dir) if res.cases else []
    folds = sorted({(r.amount, r.seed, r.fold) for r in res.runs})
    chosen = "end of training" if spec.checkpoint == "final" else "nnU-Net's best on the fold's validation cases"
    lines = [f"# Benchmark: {spec.name}", "",
             f"Dataset {spec.dataset}, configuration `{spec.configuration}`, plans `{spec.plans}`, device "
             f"`{spec.device}`, training precision `{spec.precision}`"
             f"{' (CPU bfloat16 autocast; plain = nnUNetTrainer_cpubf16)' if spec.precision == 'bf16' else ''}. "
             f"Budget per run: {spec.epochs} epochs x {spec.iterations_per_epoch} iterations "
             f"({spec.epochs * spec.iterations_per_epoch} iterations), identical for every trainer. Evaluated "
             f"checkpoint: `{spec.checkpoint}` ({chosen}), never chosen on the test set. Test set: "
             f"`{spec.test_labels}`, predicted with nnU-Net's sliding window "
             f"{'and mirroring' if spec.test_time_mirroring else 'without mirroring (--disable-tta)'}. "
             f"Runs finished: {done}/{total}.", ""]
    if spec.notes:
        lines += [spec.notes, ""]
    if failed:
        lines += [f"**Failed runs (not in the tables):** {', '.join(failed)}.", ""]
    lines += ["Label-scarce folds (splits_final.json): " + ", ".join(f"labeled {a}, seed {s} → fold {f}"
                                                                    for a, s, f in folds), ""]
    lines += ["## Test results", ""] + tables(res)
    lines += ["## Paired tests against plain nnU-Net", ""] + tests_section(res)
    lines += ["## Cost", "", "Seconds per epoch from nnU-Net's epoch timestamps (training + its validation "
              "iterations), peak memory of the training process. Runs ran one after another on the same machine; "
              "other work on the machine inflates absolute times, compare ratios with care.", ""]
    lines += cost_section(res)
    lines += ["## Plots", ""] + [f"![{f}]({f})" for f in images] + [""]
    lines += ["## Reproduce", "", "```", spec.extra.get("command", "(command not recorded)"), "```", ""]
    out = report_dir / "README.md"
    out.write_text("\n".join(lines))
    summary = {f"{t}|{a}": {m: res.summary(t, a, "fg", m) for m in METRICS}
               for t in res.trainers() for a in res.amounts}
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return out

"""The benchmark report's figures (matplotlib, agg backend).

* dice_vs_labeled.png: mean test Dice per trainer at each labeled amount, every trainer at the amount's own
  x position (± sd over seeds, or over cases with one seed);
* per_case_dice_boxplot.png: per (case, seed) Dice, as points (with a box when there are >= 10 values),
  one y-scale across amounts, only runs that exist;
* paired_difference.png: per (case, seed), trainer − plain, with the hierarchical-bootstrap Δ and 95 % CI,
  raw and after postprocessing;
* training_curves_labeled<amount>.png: losses (left axis) and nnU-Net's pseudo Dice (right axis, black),
  legend outside the axes;
* validation_dice_vs_compute.png: each row's nnU-Net validation Dice against its total training time vs plain,
  plain and plain at equal compute joined by a line (what training plain nnU-Net longer buys), when the
  benchmark has an equal-compute row.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from nnunet_proto.benchmark.results import (
    KIND_TITLE,
    KINDS,
    Results,
    log_ratio,
    log_series,
    short_name,
    split_row,
)
from nnunet_proto.benchmark.spec import PLAIN


def _amount_value(amount: str) -> float:
    return float(amount[:-1]) if amount.endswith("%") else float(amount)


def plots(res: Results, out: Path, comp: Dict[tuple, Optional[dict]]) -> List[str]:
    """Write the report's figures into ``out``; ``comp`` = results.comparisons(res). Returns the file names."""
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    files = []
    amounts = list(res.amounts)
    trainers = res.trainers()
    colors = {t: f"C{i % 10}" for i, t in enumerate(trainers)}
    markers = "osD^v<>pXh"

    # Dice vs labeled amount: every trainer at the amount's own x position (no offsets)
    xs = [_amount_value(a) for a in amounts]
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, trainer in enumerate(trainers):
        pts = [(x, res.summary(trainer, a, "fg", "Dice")) for x, a in zip(xs, amounts) if res.has(trainer, a)]
        if not pts:
            continue
        ax.errorbar([x for x, _ in pts], [100 * st[0] for _, st in pts],
                    yerr=[100 * (0 if math.isnan(st[1]) else st[1]) for _, st in pts], marker=markers[i % 10],
                    ms=7, capsize=4, color=colors[trainer], alpha=0.85, label=short_name(trainer))
    ax.set_xlabel("labeled " + ("groups/cases" if not amounts[0].endswith("%") else "%"))
    ax.set_ylabel("test Dice, mean over classes (%)")
    ax.set_xticks(xs)
    ax.set_xticklabels(amounts)
    if len(xs) == 1:
        ax.set_xlim(xs[0] - 1, xs[0] + 1)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(out / "dice_vs_labeled.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    files.append("dice_vs_labeled.png")

    # per-case Dice: one y-scale, only runs that exist, points when there are fewer than 10 values
    fig, axes = plt.subplots(1, len(amounts), figsize=(1.2 + 1.1 * len(trainers) * len(amounts) + 1, 5),
                             squeeze=False, sharey=True)
    rng = np.random.default_rng(0)
    for ax, amount in zip(axes[0], amounts):
        present = [t for t in trainers if res.has(t, amount)]
        for j, trainer in enumerate(present):
            vals = [c["fg"]["Dice"] * 100 for s in res.seeds if (trainer, amount, s) in res.cases
                    for c in res.cases[(trainer, amount, s)].values() if not math.isnan(c["fg"]["Dice"])]
            if len(vals) >= 10:
                ax.boxplot([vals], positions=[j], widths=0.6, showmeans=True, showfliers=False)
            ax.scatter(j + rng.uniform(-0.12, 0.12, len(vals)), vals, s=14, color=colors[trainer], alpha=0.7,
                       zorder=3)
            if vals and len(vals) < 10:
                ax.hlines(np.mean(vals), j - 0.25, j + 0.25, color="k", lw=2, zorder=4)
        ax.set_xticks(range(len(present)))
        ax.set_xticklabels([short_name(t) for t in present], rotation=20)
        ax.set_xlim(-0.6, len(present) - 0.4)
        ax.set_title(f"labeled {amount}: per-case test Dice")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].set_ylabel("Dice, mean over classes (%), (case, seed) points")
    fig.tight_layout()
    fig.savefig(out / "per_case_dice_boxplot.png", dpi=110)
    plt.close(fig)
    files.append("per_case_dice_boxplot.png")

    # paired differences: per (case, seed), trainer - plain, with the bootstrap Δ and 95 % CI
    kinds = [k for k in KINDS if any(c for (t, a, kk), c in comp.items() if kk == k)]
    if kinds:
        others = [t for t in trainers if t != PLAIN]
        fig, axes = plt.subplots(len(kinds), len(amounts), squeeze=False, sharey=True,
                                 figsize=(1.5 + 1.2 * max(1, len(others)) * len(amounts), 4.2 * len(kinds)))
        seed_colors = {s: f"C{i % 10}" for i, s in enumerate(res.seeds)}
        for row, kind in zip(axes, kinds):
            for ax, amount in zip(row, amounts):
                present = [t for t in others if comp.get((t, amount, kind))]
                ax.axhline(0, color="k", lw=1)
                for j, trainer in enumerate(present):
                    for s, d in res.seed_differences(trainer, amount, "Dice", "fg", kind).items():
                        ax.scatter(j - 0.1 + rng.uniform(-0.1, 0.1, d.size), 100 * d, s=12, alpha=0.6,
                                   color=seed_colors[s], label=f"seed {s}" if j == 0 else None)
                    b = comp[(trainer, amount, kind)]["dice"]
                    ax.errorbar([j + 0.22], [100 * b.delta], yerr=[[100 * (b.delta - b.ci_low)],
                                                                   [100 * (b.ci_high - b.delta)]],
                                fmt="D", color="k", capsize=5, lw=2, label="Δ, 95 % CI" if j == 0 else None)
                if not present:  # e.g. an amount whose runs are still going
                    ax.text(0.5, 0.5, "no finished pairs yet", transform=ax.transAxes, ha="center", va="center",
                            color="0.4")
                ax.set_xticks(range(len(present)))
                ax.set_xticklabels([short_name(t) for t in present], rotation=20)
                ax.set_xlim(-0.6, max(len(present), 1) - 0.4)
                ax.set_title(f"labeled {amount}, {KIND_TITLE[kind]}", fontsize=10)
                ax.grid(axis="y", alpha=0.3)
            row[0].set_ylabel("Dice trainer − plain (points)")
        # the legend from the first panel that has points (the last one may be empty), drawn beside the last
        legend = next((h for h in (ax.get_legend_handles_labels() for ax in axes.flat) if h[0]), None)
        if legend:
            axes[0, -1].legend(*legend, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "paired_difference.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        files.append("paired_difference.png")

    # training curves: losses (left axis, never black) and pseudo Dice (right axis, black); legend outside
    loss_colors = ["C0", "C1", "C3", "C4", "C5", "C6", "C8", "C9", "C7"]
    for amount in amounts:
        seed = res.seeds[0]
        keys = [(t, amount, seed) for t in trainers if (t, amount, seed) in res.curves]
        if not keys:
            continue
        fig, axes = plt.subplots(len(keys), 1, figsize=(10, 3.2 * len(keys)), squeeze=False)
        for ax, key in zip(axes[:, 0], keys):
            log = res.curves[key]
            x = range(len(log.get("train_losses", [])))
            series = [("train loss (total)", log.get("train_losses", []), "-"),
                      ("val loss", log.get("val_losses", []), "-")]
            series += [(k[4:], v, "--") for k, v in log.items() if k.startswith("ssl_loss_")]
            for (name, v, ls), color in zip(series, loss_colors * 3):
                ax.plot(range(len(v)), v, ls=ls, lw=2 if ls == "-" else 1.3, color=color, label=name,
                        marker="o" if len(v) < 20 else None, ms=3)  # a few epochs stay visible
            ax2 = ax.twinx()
            ax2.plot(x, log.get("ema_fg_dice", []), color="k", lw=2.2, label="pseudo Dice (EMA, right axis)",
                     marker="o" if len(x) < 20 else None, ms=3)
            ax2.set_ylim(0, 1)
            ax2.set_ylabel("pseudo Dice")
            ax.set_ylabel("loss")
            ax.set_title(f"{key[0]} (labeled {amount}, seed {seed})")
            ax.set_xlabel("epoch")
            h1, l1 = ax.get_legend_handles_labels()
            h2, l2 = ax2.get_legend_handles_labels()
            ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left", bbox_to_anchor=(1.08, 1))
        fig.tight_layout()
        name = f"training_curves_labeled{amount.replace('%', 'pct')}.png"
        fig.savefig(out / name, dpi=100, bbox_inches="tight")
        plt.close(fig)
        files.append(name)
    files += _signal_plots(res, out, plt)
    files += _compute_plot(res, out, plt)
    return files


def _compute_plot(res: Results, out: Path, plt) -> List[str]:
    """Per amount, each row's nnU-Net validation Dice (mean over seeds) against its total training time vs plain
    (``Results.total_cost``: warm starts and self-training's teacher included); plain and plain at equal compute
    joined by a black line. A row above that line got more from its compute than plain trained longer. Only
    with an equal-compute row (without one there is no line to read against); EMA teachers are left out (the
    same run as their student)."""
    if not any(split_row(t)[0] == PLAIN and split_row(t)[1] != 1.0 for t in res.trainers()):
        return []
    amounts = [a for a in res.amounts if res.has(PLAIN, a)]
    fig, axes = plt.subplots(1, len(amounts), figsize=(6.5 * len(amounts), 5), squeeze=False)
    drawn = False
    for ax, amount in zip(axes[0], amounts):
        pts = []
        for t in res.trainers():
            if split_row(t)[2] or not res.has(t, amount):
                continue
            x, y = res.total_cost(t, amount)["seconds_vs_plain"], 100 * res.validation_dice(t, amount)
            if math.isfinite(x) and math.isfinite(y):
                pts.append((t, x, y))
        plain = sorted((x, y) for t, x, y in pts if split_row(t)[0] == PLAIN)
        if len(plain) >= 2:
            ax.plot(*zip(*plain), color="k", lw=1.5, marker="s", ms=7, label="plain nnU-Net, trained longer")
        for i, (t, x, y) in enumerate(p for p in pts if split_row(p[0])[0] != PLAIN):
            ax.scatter([x], [y], s=55, marker="osD^v<>pXh"[i % 10], color=f"C{i % 10}", label=short_name(t),
                       zorder=3)
        drawn = drawn or bool(pts)
        ax.set_xlabel("total training time vs one plain run")
        ax.set_ylabel("validation Dice, foreground mean (%)")
        ax.set_title(f"labeled {amount}: validation Dice against compute", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    name = "validation_dice_vs_compute.png"
    if drawn:
        fig.tight_layout()
        fig.savefig(out / name, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return [name] if drawn else []


def _signal_plots(res: Results, out: Path, plt) -> List[str]:
    """Per amount, one row per semi-supervised trainer (first seed): left, each foreground class' pseudo-label
    share over its labeled share and the gate's kept fraction; right, each term's weighted gradient norm over
    the supervised one (log scale). The per-epoch view of the report's "Semi-supervised signal" table."""
    files = []
    for amount in res.amounts:
        # each trainer's first seed with a training log of pseudo labels
        keys = [next((k for k in ((t, amount, s) for s in res.seeds) if "ssl_pl_share_c0" in res.curves.get(k, {})),
                     None) for t in res.trainers() if t != PLAIN]
        keys = [k for k in keys if k is not None]
        if not keys:
            continue
        fig, axes = plt.subplots(len(keys), 2, figsize=(13, 3.0 * len(keys)), squeeze=False)
        for (left, right), key in zip(axes, keys):
            log = res.curves[key]
            for i, c in enumerate(res.classes):
                r = log_ratio(log, f"ssl_pl_share_c{c}", f"ssl_labeled_share_c{c}")
                left.plot(range(r.size), r, color=f"C{i}", lw=2, label=f"{res.label_names[c]} pseudo / labeled share")
            kept = log_series(log, "ssl_pl_kept")
            left.plot(range(kept.size), kept, color="0.4", ls="--", lw=1.5, label="kept by the gate")
            left.axhline(1.0, color="k", lw=0.8)
            left.axhline(0.1, color="r", lw=0.8, ls=":", label="collapse warning (0.1)")
            left.set_ylim(bottom=0)
            left.set_title(f"{key[0]} (labeled {amount}, seed {key[2]}): pseudo labels", fontsize=9)
            left.set_xlabel("epoch")
            left.legend(fontsize=6, loc="lower right")
            terms = sorted(k[len("ssl_gradnorm_"):] for k in log if k.startswith("ssl_gradnorm_")
                           and k not in ("ssl_gradnorm_sup", "ssl_gradnorm_total"))
            probed = False
            for j, t in enumerate(terms):
                r = log_ratio(log, f"ssl_gradnorm_{t}", "ssl_gradnorm_sup")
                probed = probed or bool(np.isfinite(r).any())
                if np.isfinite(r).any() and np.nanmax(r) > 0:
                    right.semilogy(range(r.size), np.where(r > 0, r, np.nan), color=f"C{j + 4}", lw=2, label=t)
            right.axhline(0.1, color="k", lw=0.8, ls=":")
            right.set_title("weighted gradient / supervised gradient (probe)", fontsize=9)
            right.set_xlabel("epoch")
            if right.get_legend_handles_labels()[0]:
                right.legend(fontsize=7, loc="lower right")
            else:  # probed and all 0 (weights 0), or never probed (older runs, DDP, torch.compile)
                right.text(0.5, 0.5, "no semi-supervised gradient (weights 0)" if probed else "gradients not probed",
                           transform=right.transAxes, ha="center", va="center", color="0.4")
        fig.tight_layout()
        name = f"pseudo_labels_labeled{amount.replace('%', 'pct')}.png"
        fig.savefig(out / name, dpi=100, bbox_inches="tight")
        plt.close(fig)
        files.append(name)
    return files

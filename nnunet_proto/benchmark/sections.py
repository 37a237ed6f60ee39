"""The report's text sections: tables of the rows against plain nnU-Net, the A/A control, spread and power,
validation as a guide, class presence, stray islands, postprocessing, self-training and cost.

Each ``*_section`` returns Markdown lines; the numbers come from ``results.Results``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import numpy as np

from nnunet_proto.benchmark.results import (
    CLASS_PRESENCE_MIN,
    KIND_TITLE,
    KINDS,
    METRICS,
    PACE_PERCENTILE,
    Results,
    display_name,
    short_name,
    split_row,
)
from nnunet_proto.benchmark.spec import PLAIN, is_self_training, steps_row
from nnunet_proto.benchmark.stats import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_RNG_SEED,
    P_VALUE_TEXT,
    TARGET_EFFECT,
    BootstrapResult,
)


def none_if_nan(x):
    """NaN -> None (for JSON and for "–" cells)."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


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
                        lines.append(f"| {amount} | {display_name(trainer)} | " + " | ".join(
                            ["missing (no post-processed metrics, see below)"] + ["–"] * (len(res.labels) - 1))
                            + " |")
                    continue
                cells = [_fmt(*res.summary(trainer, amount, lab, metric, kind)[:2], metric) for lab in res.labels]
                n_raw = res.summary(trainer, amount, "fg", metric)[2]
                mark = "" if n_seeds == len(res.seeds) else f" ({n_seeds} of {len(res.seeds)} seeds)"
                if kind != "raw" and n_seeds < n_raw:
                    mark += " (some runs lack post-processed metrics)"
                lines.append(f"| {amount} | {display_name(trainer)}{mark} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def comparison_section(res: Results, comp: Dict[tuple, Optional[dict]]) -> List[str]:
    n_b = next((c["dice"].resamples for c in comp.values() if c), BOOTSTRAP_RESAMPLES)
    lines = [f"Δ = trainer − plain nnU-Net trained on the same labeled cases with the same seed, on the same test "
             f"cases; Dice in points, HD95 in mm. Δ is the mean over seeds of each seed's mean over test cases. "
             f"The 95 % CI and p come from a hierarchical bootstrap ({n_b} resamples, fixed RNG seed "
             f"{BOOTSTRAP_RNG_SEED}): resample the seeds with replacement, then the test cases within each drawn "
             f"seed, so that run-to-run variance counts; {P_VALUE_TEXT}. The Wilcoxon p (scipy, over the pooled "
             f"(case, seed) pairs) is for reference only: it treats pairs as independent and ignores run-to-run "
             f"variance. Wins/losses: pairs where the trainer's Dice is higher/lower. s/step: seconds per training "
             f"iteration at the row's pace (Cost section), relative to plain at the same amount.", ""]
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
                steps = _steps_txt(res, trainer)
                if c is None:
                    why = ("missing: no post-processed metrics for this trainer or plain (see Postprocessing)"
                           if kind == "postprocessed" else "no paired plain run")
                    lines.append(f"| {amount} | {display_name(trainer)} | – | {steps} | 0 | {why} | – | – | – | "
                                 f"– | – | {ratio_txt} |")
                    continue
                hd = c["hd95"]
                lines.append(
                    f"| {amount} | {display_name(trainer)} | {','.join(map(str, c['seeds']))} | {steps} | "
                    f"{c['n_pairs']} | "
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
                lines.append(f"| {amount} | {display_name(trainer)} | {kind} | "
                             + " | ".join(_ci_txt(c["per_class_dice"][lab], 100, 1) for lab in res.classes) + " |")
    return lines + [""]


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
                lines.append(f"| {amount} | {display_name(trainer)} | {kind} | {per} | "
                             f"{100 * sp['sd_over_seeds']:.1f} | {_p(sp['p_t_over_seeds'])} | "
                             f"{'–' if math.isnan(need) else int(need)} |")
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
        lines.append(f"| {r['labeled_amount']} | {display_name(r['trainer'])} | {r['kind']} | "
                     + " | ".join(cells) + " | " + ("yes" if r["ok"] else "**NO**") + " |")
    lost = sorted({(r["trainer"], r["labeled_amount"]) for r in rows if not r["ok"] and r["kind"] == "raw"})
    if lost:
        lines += ["", "**Classes lost** (raw predictions): "
                  + ", ".join(f"{display_name(t)} at labeled {a}" for t, a in lost) + "."]
    return lines + [""]


def _islands_table(res: Results, validation: bool) -> List[str]:
    names = [res.label_names[c] for c in res.classes]
    lines = ["| trainer | labeled | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for amount in res.amounts:
        for trainer in res.trainers():
            m = res.island_means(trainer, amount, validation)
            if m:
                cells = [f"{m[c]['components']:.1f} / {100 * m[c]['outside_largest']:.1f} %"
                         if not math.isnan(m[c]['outside_largest']) else f"{m[c]['components']:.1f} / –"
                         for c in res.classes]
                lines.append(f"| {display_name(trainer)} | {amount} | " + " | ".join(cells) + " |")
    return lines + [""]


def islands_section(res: Results) -> List[str]:
    lines = (["Raw test predictions, before postprocessing: per class, the mean number of connected components "
              "per case (1 = a single blob) / the share of the class' predicted voxels outside its largest "
              "component (the stray islands that keeping the largest component removes). Mean over seeds.", ""]
             + _islands_table(res, False) if res.islands else
             ["No test predictions to inspect (run folders without `test_predictions/`).", ""])
    if res.validation_islands:
        lines += ["The same on each run's final validation predictions (nnU-Net's validation cases of the fold, "
                  "before postprocessing), the cases a screening is read on; EMA-teacher rows have none.", ""]
        lines += _islands_table(res, True)
    return lines


def postprocessing_section(res: Results) -> List[str]:
    lines = ["nnU-Net's `determine_postprocessing` (as `nnUNetv2_determine_postprocessing`) on each run's own "
             "validation predictions: keep only the largest foreground component, then the largest component per "
             "class, each step kept only if it raises the validation Dice. The chosen steps are applied to that "
             "run's test predictions, the same procedure for every trainer.", "",
             "| trainer | labeled | seed | chosen steps | validation Dice before → after |", "|---|---|---|---|---|"]
    for key in sorted(res.pp_status, key=lambda k: (res.amounts.index(k[1]), res.trainers().index(k[0]), k[2])):
        st = res.pp_status[key]
        if not st.get("available"):
            lines.append(f"| {display_name(key[0])} | {key[1]} | {key[2]} | **missing**: {st.get('reason', '')} | – |")
            continue
        steps = "; ".join(_step_txt(x, res.label_names) for x in st.get("steps", [])) or "none (nothing improved)"
        before, after = st.get("validation_dice_before"), st.get("validation_dice_after")
        val = f"{100 * before:.1f} → {100 * after:.1f}" if before is not None and after is not None else "–"
        lines.append(f"| {display_name(key[0])} | {key[1]} | {key[2]} | {steps} | {val} |")
    return lines + [""]


def _step_txt(step: dict, names: Dict[str, str]) -> str:
    labels = step.get("kwargs", {}).get("labels_or_regions")
    labels = labels if isinstance(labels, list) else [labels]
    what = ", ".join(names.get(str(x), str(x)) for x in labels)
    return f"largest component of {what}" if step.get("function", "").startswith("remove_all_but_largest") else \
        f"{step.get('function')}({what})"


def _steps_txt(res: Results, row: str) -> str:
    """Training steps of one run of the row; a self-training student adds its teacher's (the plain run's), a
    warm-started run the plain run it starts from."""
    trainer, _, teacher = split_row(row)
    if is_self_training(trainer) and not teacher:
        return f"{res.steps(row)} + {res.steps(PLAIN)} (teacher)"
    if res.warm_started(row) and not teacher:
        return f"{res.steps(row)} + {res.steps(PLAIN)} (warm start)"
    return str(res.steps(row))


def cost_section(res: Results) -> List[str]:
    lines = [f"Per row: seconds per epoch at the row's pace and their median, per iteration, relative to plain "
             f"(nnU-Net's epoch timestamps: training plus its validation iterations). *Pace*: each run's "
             f"{PACE_PERCENTILE}th percentile of its epoch times, the fastest run of the row (plain: of plain's "
             f"runs and its equal-compute row's, the same work per epoch); every epoch does the same work and other"
             f" work on the machine only ever slows one, so the fast epochs are the row's own cost and the median "
             f"also measures how much the machine was shared. Training steps of one run (the self-training student "
             f"adds its teacher's, the plain run of the same fold, and a warm-started run the plain run it starts "
             f"from); *total time vs plain*: one run's training time over plain's, each row's time being its pace ×"
             f" its epochs, for self-training the teacher's training plus the pseudo-labeling (the fastest of the "
             f"amount's runs) plus the student's, for a warm-started run the plain run's training plus its own; "
             f"peak memory; nnU-Net's validation Dice; *trained on*: the machine (processor or GPU) of every run of"
             f" the row (time ratios compare trainers only between rows trained on one machine; runs of older "
             f"versions did not record it).",
             "", "| trainer | s/epoch (pace) | s/epoch (median) | s/iteration (pace) | vs plain (pace) | "
             "training steps | total time vs plain | pseudo-labeling s | peak memory MB | "
             "validation Dice (nnU-Net, val cases) | trained on |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    plain_s = res.epoch_seconds(PLAIN)
    for trainer in res.trainers():
        infos = [i for k, i in res.info.items() if k[0] == trainer]
        s = [i.get("seconds_per_epoch_median") for i in infos if i.get("seconds_per_epoch_median")]
        mem = [i.get("peak_memory_mb") for i in infos if i.get("peak_memory_mb") is not None]
        val = [i.get("validation_foreground_dice") for i in infos if i.get("validation_foreground_dice") is not None]
        pace = res.epoch_seconds(trainer)
        if not s or not math.isfinite(pace):
            continue
        median = float(np.median(s))
        mem_txt = f"{np.median(mem):.0f}" if mem else "–"
        val_txt = f"{100 * np.mean(val):.1f}" if val else "–"
        costs = [res.total_cost(trainer, a) for a in res.amounts if res.has(trainer, a)]
        total = [c["seconds_vs_plain"] for c in costs if math.isfinite(c["seconds_vs_plain"])]
        pl = [c["pseudo_label_seconds"] for c in costs if math.isfinite(c["pseudo_label_seconds"])]
        teacher = split_row(trainer)[2]
        lines.append(f"| {display_name(trainer)} | {pace:.1f} | {median:.1f} | "
                     f"{pace / res.spec.iterations_per_epoch:.3f} | {pace / plain_s:.2f}x | "
                     f"{_steps_txt(res, trainer)} | "
                     f"{'same run' if teacher else (f'{np.median(total):.2f}x' if total else '–')} | "
                     f"{f'{np.median(pl):.0f}' if pl else '–'} | {mem_txt} | {val_txt} | "
                     f"{_machines_txt(res.training_machines(trainer))} |")
    machines = {m for t in res.trainers() for m in res.training_machines(t) if m}
    if len(machines) > 1:
        lines += ["", f"**Rows trained on different machines** ({'; '.join(sorted(machines))}): their time ratios "
                      f"compare machines as well as trainers."]
    return lines + [""]


def _machines_txt(machines: List[Optional[str]]) -> str:
    """The cost table's *trained on* cell: each machine once; None is a run of an older version."""
    return "; ".join(m if m else "not recorded" for m in machines) or "–"


#: a measured cost up to this much above the equal-compute factor is the factor's rounding, not a shortfall
EQUAL_COMPUTE_SLACK = 1.05


def equal_compute_check(res: Results) -> Optional[dict]:
    """Whether plain at equal compute got as much compute as the most expensive row, by this benchmark's own
    measurement (``Results.total_cost``: the self-training row's teacher and pseudo-labeling included). None
    without an equal-compute row. ``covered``: that row's total time vs plain is at most the factor (x1.05)."""
    factor = res.spec.equal_compute
    if factor is None:
        return None
    costs = [(res.total_cost(t, a)["seconds_vs_plain"], t, a) for t in res.trainers() for a in res.amounts
             if t != PLAIN and split_row(t)[1] == 1.0 and not split_row(t)[2] and res.has(t, a)]
    costs = [c for c in costs if math.isfinite(c[0])]
    own = [res.total_cost(t, a)["seconds_vs_plain"] for t in res.trainers() for a in res.amounts
           if split_row(t)[1] == factor and res.has(t, a)]
    own = [x for x in own if math.isfinite(x)]
    if not costs:
        return {"factor": factor, "most_expensive": None, "covered": None,
                "equal_compute_seconds_vs_plain": float(np.median(own)) if own else None}
    cost, trainer, amount = max(costs)
    return {"factor": factor, "most_expensive": {"trainer": trainer, "labeled_amount": amount,
                                                 "seconds_vs_plain": cost},
            "covered": cost <= factor * EQUAL_COMPUTE_SLACK,
            "equal_compute_seconds_vs_plain": float(np.median(own)) if own else None}


def equal_compute_lines(check: Optional[dict]) -> List[str]:
    """The report's sentence on ``equal_compute_check``."""
    if check is None or check["most_expensive"] is None:
        return []
    top = check["most_expensive"]
    own = check["equal_compute_seconds_vs_plain"]
    text = (f"Measured here (*total time vs plain* in the Cost section): the most expensive row is "
            f"{display_name(top['trainer'])} at {top['seconds_vs_plain']:.2f}x plain (labeled {top['labeled_amount']})"
            + (f"; plain at equal compute took {own:.2f}x" if own is not None else "") + ". ")
    if check["covered"]:
        text += f"The factor {check['factor']:g} covers every row."
    else:
        text += (f"**The factor {check['factor']:g} does not cover it**: that row had "
                 f"{top['seconds_vs_plain'] / check['factor']:.2f}x the compute of plain at equal compute, so the "
                 f"equal-compute row understates what its budget buys plain nnU-Net.")
    return [text, ""]


def against_equal_compute(res: Results) -> Dict[tuple, Optional[dict]]:
    """{(row, amount, kind): Results.compare against plain at equal compute} for every row but plain, the
    equal-compute row and the A/A control; empty without an equal-compute row."""
    if res.spec.equal_compute is None:
        return {}
    ref = steps_row(PLAIN, res.spec.equal_compute)
    return {(t, a, k): res.compare(t, a, k, reference=ref) for a in res.amounts for t in res.trainers()
            if t not in (PLAIN, ref, res.control) and res.has(t, a) and res.has(ref, a) for k in KINDS}


def equal_compute_section(res: Results, head: Dict[tuple, Optional[dict]]) -> List[str]:
    """Each row against plain nnU-Net at equal compute: the comparison for a fixed compute budget."""
    if not head:
        return [("No plain run at equal compute (--equal-compute)." if res.spec.equal_compute is None else
                 "No row with a paired plain run at equal compute yet."), ""]
    lines = [f"Δ = row − plain nnU-Net trained for {res.spec.equal_compute:g}× the steps on the same labeled "
             f"cases with the same seed, on the same test cases: what the row buys over spending its budget on "
             f"more plain steps. Same hierarchical bootstrap and seed-level t-test as against plain; Dice in points, "
             f"HD95 in mm. Whether the factor covers each row's measured cost: see the top of this report.", "",
             "| labeled | trainer | predictions | n pairs | Dice Δ [95 % CI] | p (bootstrap) | Δ per seed | "
             "p (t over seeds) | wins/losses | HD95 Δ [95 % CI] |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (trainer, amount, kind), c in head.items():
        if c is None:
            lines.append(f"| {amount} | {display_name(trainer)} | {kind} | 0 | missing | – | – | – | – | – |")
            continue
        sp = c["seed_spread"]
        per = ", ".join(f"s{s} {100 * d:+.1f}" for s, d in sorted(sp["seed_deltas"].items())) if sp else "–"
        lines.append(f"| {amount} | {display_name(trainer)} | {kind} | {c['n_pairs']} | {_ci_txt(c['dice'], 100, 1)} "
                     f"| {_p(c['dice'].p)} | {per} | {_p(sp['p_t_over_seeds'] if sp else None)} | "
                     f"{c['wins']}/{c['losses']} | {_ci_txt(c['hd95'], 1, 1)} |")
    return lines + [""]


def comparison_json(c: dict, label_names: Dict[int, str]) -> dict:
    """One ``Results.compare`` result as summary.json writes it (Dice as fractions, HD95 in mm), for the
    comparisons against plain and against plain at equal compute alike."""
    d, h = c["dice"], c["hd95"]
    return {"seeds": c["seeds"], "n_pairs": c["n_pairs"], "dice_delta": d.delta, "dice_ci95": [d.ci_low, d.ci_high],
            "p_bootstrap": d.p, "p_wilcoxon": none_if_nan(c["p_wilcoxon"]), "wins": c["wins"], "losses": c["losses"],
            "hd95_delta": h.delta if h else None, "hd95_ci95": [h.ci_low, h.ci_high] if h else None,
            "hd95_p_bootstrap": h.p if h else None, "seed_spread": c["seed_spread"],
            "per_class_dice": {label_names[lab]: ({"delta": b.delta, "ci95": [b.ci_low, b.ci_high], "p_bootstrap": b.p}
                                                  if b else None) for lab, b in c["per_class_dice"].items()}}


def equal_compute_json(head: Dict[tuple, Optional[dict]], label_names: Dict[int, str]) -> List[dict]:
    """summary.json's ``against_equal_compute`` rows: the same fields as ``comparisons``, against plain at equal
    compute."""
    return [{"trainer": trainer, "labeled_amount": amount, "kind": kind,
             **(comparison_json(c, label_names) if c is not None else
                {"missing": "no paired run of plain at equal compute"})}
            for (trainer, amount, kind), c in head.items()]


def self_training_section(res: Results) -> List[str]:
    """What the self-training students learnt from: per run, the pseudo labels of the plain run of the same fold."""
    rows = [(k, i) for k, i in sorted(res.info.items(), key=lambda x: (x[0][1], x[0][0], x[0][2]))
            if is_self_training(split_row(k[0])[0]) and not split_row(k[0])[2]]
    if not rows:
        return ["No self-training row in this benchmark (--self-training).", ""]
    lines = ["Offline self-training (`nnunet_proto pseudo-label` + `nnUNetTrainerSelfTraining`): the plain run of "
             "the same fold and seed is the teacher. It predicts every case of the fold's unlabeled pool (its "
             "`unlabeled` split cases and `imagesUnlabeled/`) with nnU-Net's predictor, with mirroring, and its own "
             "postprocessing (determined on its validation predictions) is applied; the student trains on the "
             "labeled and the pseudo-labeled cases through nnU-Net's data loader and loss, with the same budget as "
             "every row. Validation and test cases are never pseudo-labeled.", "",
             "| trainer | labeled | seed | pseudo labels | teacher's postprocessing | pseudo-labeling s |",
             "|---|---|---|---|---|---|"]
    for (row, amount, seed), info in rows:
        steps = info.get("pseudo_label_postprocessing") or []
        pp = ", ".join(f"{f} ×{steps.count(f)}" if steps.count(f) > 1 else f for f in dict.fromkeys(steps)) or "none"
        secs = res.pseudo_label_seconds((row, amount, seed))
        lines.append(f"| {display_name(row)} | {amount} | {seed} | {info.get('pseudo_labels', '–')} | {pp} | "
                     f"{f'{secs:.0f}' if math.isfinite(secs) else '– (labels of an earlier run)'} |")
    return lines + ["*pseudo-labeling s*: the teacher's wall time to label the whole pool, scaled from the cases "
                    "this run predicted where it resumed an interrupted labeling.", ""]

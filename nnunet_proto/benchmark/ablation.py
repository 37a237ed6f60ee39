"""The report's "Validation ablations" section: which change moved what, on nnU-Net's validation cases.

A variant row (``nnUNetTrainerCPCL_strong``) whose base trainer (``nnUNetTrainerCPCL``, the name before the first
``_`` after the prefix) ran in the same benchmark is compared with it: foreground and per-class validation Dice of
both, and the variant's Δ against its base and against plain nnU-Net (means over the seeds both have). Per-class
validation Dice comes from nnU-Net's own ``validation/summary.json`` in each run's fold folder. These are the
numbers a screening decides on; the test cases play no part.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from nnunet_proto.benchmark.results import Results, is_trainer_row, nanmean
from nnunet_proto.benchmark.spec import PLAIN

#: variant suffixes of controls (CPCL's labeled-patch control): screened to read an effect, never confirmed as a method
CONTROL_SUFFIXES = ("labeledcontrol",)
#: the screening's resolution (docs/methods/README.md, decision rule): one run cannot tell validation Dice differences
#: under 3 points apart (the A/A control of ``acdc_confirm_bf16`` differed from plain by up to 2.9 on them)
SCREEN_RESOLUTION = 0.03


def is_control_variant(trainer: str) -> bool:
    """A variant screened as a control (:data:`CONTROL_SUFFIXES`), never a candidate."""
    return trainer.split("_")[-1] in CONTROL_SUFFIXES


def screening_reading(trainer: str, delta_vs_base: float) -> str:
    """Steps 2 and 4 of the screening's decision rule for one variant and its Δ foreground validation Dice against
    its base: a change ≥ 3 points ahead is a candidate default, one under 3 points apart is not resolved whatever
    its sign; a control within 3 points of its base cannot tell whether the base's gain uses the unlabeled images."""
    if math.isnan(delta_vs_base):
        return "no validation Dice"
    ahead, behind = delta_vs_base >= SCREEN_RESOLUTION, delta_vs_base <= -SCREEN_RESOLUTION
    if is_control_variant(trainer):
        return ("control ahead by ≥ 3: the unlabeled patches cost the base" if ahead else
                "base ahead by ≥ 3: its gain uses the unlabeled images" if behind else
                "within 3: cannot tell whether the base's gain uses the unlabeled images")
    return "candidate default (≥ 3 ahead)" if ahead else "behind by ≥ 3" if behind else "not resolved (under 3)"


def base_trainer(trainer: str) -> str:
    """``nnUNetTrainerCPCL_strong`` -> ``nnUNetTrainerCPCL``; a name without a variant suffix is its own base."""
    return trainer.split("_")[0]


def ablation_base(trainer: str, ran: Sequence[str]) -> Optional[str]:
    """The row a variant is read against in a screening: its nearest ancestor by name that ran (``_warm_lcc`` ->
    ``_warm`` when that ran, else the method's default); None for a method's default or when no ancestor ran."""
    parts = trainer.split("_")
    for cut in range(len(parts) - 1, 0, -1):
        ancestor = "_".join(parts[:cut])
        if ancestor in ran:
            return ancestor
    return None


def confirmation_picks(ranking: List[dict], k: int = 3) -> List[str]:
    """Step 1 of the screening's decision rule (docs/methods/README.md): the ``k`` best rows of a screening's
    ``validation_ranking`` (best first, as summary.json holds it), at most one per method (its default or a variant,
    whichever validates better). Controls (:data:`CONTROL_SUFFIXES`) and EMA-teacher or equal-compute rows are not
    candidates."""
    if k < 1:
        raise ValueError(f"pick at least one trainer, got k={k}")
    picked: Dict[str, str] = {}
    scored = [r for r in ranking if r.get("validation_dice") is not None and not math.isnan(r["validation_dice"])]
    for row in sorted(scored, key=lambda r: -r["validation_dice"]):
        trainer = row["trainer"]
        if is_control_variant(trainer) or not is_trainer_row(trainer):
            continue  # a control, or an EMA-teacher / equal-compute row (not a trainer to confirm)
        picked.setdefault(base_trainer(trainer), trainer)
    return list(picked.values())[:k]


def equal_compute_factor(summary: dict, picks: Sequence[str], amount: str = "4") -> Tuple[float, str]:
    """Plain nnU-Net at equal compute for a confirmation of ``picks``: the largest *total time vs plain* of the
    picked rows in the screening's ``summary.json`` (``cost_vs_plain.seconds``: a warm start's plain training and
    offline self-training's teacher and pseudo-labeling included), rounded up to one decimal, and a sentence that
    says where it comes from. Refused (ValueError) when a pick has no measured cost or when a pick's runs and
    plain's trained on different machines (time ratios would compare machines); runs that recorded no machine
    (older versions) are accepted and the sentence says so."""
    rows = {r["trainer"]: r for r in summary.get("comparisons", []) if r.get("labeled_amount") == amount}
    measured, unrecorded = [], []
    for trainer in picks:
        row = rows.get(trainer)
        ratio = (row.get("cost_vs_plain") or {}).get("seconds") if row else None
        if ratio is None or not math.isfinite(ratio):
            raise ValueError(f"{trainer} has no measured cost against plain at {amount} labeled in the screening "
                             f"(unfinished, or plain missing): set the factor yourself (NNUNET_PROTO_EQUAL_COMPUTE "
                             f"and NNUNET_PROTO_EQUAL_COMPUTE_SOURCE for scripts/acdc_benchmark.sh)")
        own, plain = row.get("training_machines", [None]), row.get("plain_training_machines", [None])
        machines = own + plain
        known = {m for m in machines if m}
        if len(known) > 1:
            raise ValueError(f"{trainer} and plain trained on different machines ({'; '.join(sorted(known))}): their "
                             f"time ratio compares machines. Set the factor from a side-by-side timing yourself "
                             f"(NNUNET_PROTO_EQUAL_COMPUTE and NNUNET_PROTO_EQUAL_COMPUTE_SOURCE)")
        unrecorded += [trainer] if None in own else []
        unrecorded += ["plain"] if None in plain and "plain" not in unrecorded else []
        measured.append((ratio, trainer, sorted(known)))
    if not measured:
        raise ValueError("no trainer to confirm: the equal-compute factor needs at least one pick")
    ratio, trainer, known = max(measured)
    factor = math.ceil(round(ratio * 10, 6)) / 10
    where = f"on {known[0]}" if known else "machine not recorded"
    note = f"; machine not recorded for {' and '.join(unrecorded)}" if unrecorded and known else ""
    return factor, (f"{trainer}, {ratio:.2f}x plain's total training time in the screening "
                    f"({summary.get('benchmark')}, {amount} labeled, {where}{note}), rounded up to {factor:.1f}")


def validation_per_class(info: dict) -> Dict[str, float]:
    """nnU-Net's validation Dice of one run, ``{"fg": ..., "<label>": ...}``, from its copy of nnU-Net's
    ``validation/summary.json`` in the run folder (``info["validation_summary"]``, set by Results) or else from its
    fold folder (``run_info.json``'s ``output_folder``); only the foreground mean (run_info) when both are gone."""
    out = {"fg": info.get("validation_foreground_dice")}
    folder = info.get("output_folder")
    summary = Path(info["validation_summary"]) if info.get("validation_summary") else \
        Path(folder) / "validation" / "summary.json" if folder else None
    if summary is not None and summary.is_file():
        data = json.loads(summary.read_text())
        out["fg"] = data.get("foreground_mean", {}).get("Dice", out["fg"])
        out.update({str(k): v.get("Dice") for k, v in data.get("mean", {}).items() if isinstance(v, dict)})
    return {k: (math.nan if v is None else float(v)) for k, v in out.items()}


def ablation_rows(res: Results) -> List[dict]:
    """Per amount and variant row with its base in the benchmark: validation Dice (fg and per class) of the
    variant, its base and plain, means over the seeds all three have, and the Δs."""
    rows = []
    trainers = [t for t in res.trainers() if is_trainer_row(t)]
    labels = ["fg"] + list(res.classes)
    for amount in res.amounts:
        for trainer in trainers:
            base = ablation_base(trainer, trainers)
            if base is None or trainer == res.control:
                continue
            seeds = [s for s in res.seeds if all((t, amount, s) in res.info for t in (trainer, base, PLAIN))]
            if not seeds:
                continue
            val: Dict[str, Dict[str, float]] = {}
            for t in (trainer, base, PLAIN):
                runs = [validation_per_class(res.info[(t, amount, s)]) for s in seeds]
                val[t] = {lab: nanmean([r.get(lab) for r in runs]) for lab in labels}
            name = {lab: res.label_names.get(lab, lab) for lab in labels}
            rows.append({"trainer": trainer, "base": base, "labeled_amount": amount, "seeds": seeds,
                         "validation_dice": {name[lab]: val[trainer][lab] for lab in labels},
                         "base_validation_dice": {name[lab]: val[base][lab] for lab in labels},
                         "delta_vs_base": {name[lab]: val[trainer][lab] - val[base][lab] for lab in labels},
                         "delta_vs_plain": {name[lab]: val[trainer][lab] - val[PLAIN][lab] for lab in labels},
                         "base_delta_vs_plain": {name[lab]: val[base][lab] - val[PLAIN][lab] for lab in labels},
                         "reading": screening_reading(trainer, val[trainer]["fg"] - val[base]["fg"])})
    return rows


def _pts(x: Optional[float], signed: bool = True) -> str:
    if x is None or math.isnan(x):
        return "–"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def ablation_section(res: Results, rows: List[dict]) -> List[str]:
    if not rows:
        return ["No variant ran beside its base trainer in this benchmark.", ""]
    names = [res.label_names.get(c, c) for c in res.classes]
    lines = ["Each variant against its base trainer on nnU-Net's validation cases of the fold (the numbers a "
             "screening decides on; never the test cases): validation Dice in points, foreground mean and per "
             f"class ({' / '.join(names)}), mean over the seeds where variant, base and plain all ran. With one "
             "seed, compare the Δs with the A/A control's run-to-run spread before reading a change as an effect. "
             "*reading*: the pre-registered rule of the redesign screening (docs/methods/README.md): a variant ≥ 3 "
             "points over its base is a candidate default (the confirmation then decides), under 3 points apart it "
             "is not resolved whatever the sign; a control within 3 points of its base cannot tell.",
             "", f"| labeled | variant | base | seeds | validation Dice (mean; {' / '.join(names)}) | Δ vs base | "
             "Δ vs plain (variant; base) | reading |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        v, d = r["validation_dice"], r["delta_vs_base"]
        per_class = " / ".join(_pts(v[n], False) for n in names)
        d_class = " / ".join(_pts(d[n]) for n in names)
        lines.append(f"| {r['labeled_amount']} | {r['trainer']} | {r['base']} | {len(r['seeds'])} | "
                     f"{_pts(v['mean'], False)} ({per_class}) | {_pts(d['mean'])} ({d_class}) | "
                     f"{_pts(r['delta_vs_plain']['mean'])}; {_pts(r['base_delta_vs_plain']['mean'])} | "
                     f"{r['reading']} |")
    return lines + [""]

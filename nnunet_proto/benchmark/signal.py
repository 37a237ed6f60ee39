"""The report's "Semi-supervised signal" section: how hard each semi-supervised term pushed, from the runs' logs.

Per row and amount, from each run's training log (curves.json) over its last epochs: each term's weighted
gradient norm over the supervised one, each class' pseudo-label share over its labeled share, the confidence
gate's kept fraction (all voxels and per foreground class), the teacher's confidence and the share of unlabeled
voxels where teacher and student argmax disagree (a teacher that is a copy of the student: near 0).
"""
from __future__ import annotations

import math
from typing import List

import numpy as np

from nnunet_proto.benchmark.results import Results, log_ratio, log_series
from nnunet_proto.benchmark.spec import PLAIN

#: the semi-supervised signal is summarised over the last epochs of each run (probe values are one step each)
SIGNAL_TAIL_EPOCHS = 5


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
            if trainer == PLAIN or not any(k.startswith("ssl_") for log in logs for k in log):
                continue  # plain nnU-Net's log (plain, equal compute, self-training students): no such signal
            terms = sorted({k[len("ssl_gradnorm_"):] for log in logs for k in log if k.startswith("ssl_gradnorm_")}
                           - {"sup", "total"})
            grad = {t: _seed_mean([log_ratio(log, f"ssl_gradnorm_{t}", "ssl_gradnorm_sup") for log in logs], np.median)
                    for t in terms}
            share = {res.label_names[c]: _seed_mean([log_ratio(log, f"ssl_pl_share_c{c}", f"ssl_labeled_share_c{c}")
                                                     for log in logs]) for c in res.classes}
            rows.append({"trainer": trainer, "labeled_amount": amount, "seeds": len(logs),
                         "gradient_vs_supervised": grad, "pseudo_label_share_vs_labeled": share,
                         "kept_by_gate": _seed_mean([log_series(log, "ssl_pl_kept") for log in logs]),
                         "kept_by_gate_per_class": {
                             res.label_names[c]: _seed_mean([log_series(log, f"ssl_pl_kept_c{c}") for log in logs])
                             for c in res.classes},
                         "teacher_confidence": _seed_mean([log_series(log, "ssl_pl_confidence") for log in logs]),
                         "teacher_disagreement": _seed_mean([log_series(log, "ssl_teacher_disagreement")
                                                             for log in logs])})
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
             "oversampling). *Kept*: voxels passing the confidence gate, of all and of each class' pseudo-labeled "
             "voxels (a gate that selects keeps well below 1). *Disagreement*: the share of unlabeled voxels where "
             "the teacher's and the student's argmax differ (near 0: the teacher is a copy of the student). Per "
             "epoch: the `ssl_*` panels of each run's progress.png and the pseudo_labels plots below.", "",
             "| trainer | labeled | gradient / supervised | pseudo / labeled share (" + " / ".join(names)
             + ") | kept | kept per class | confidence | disagreement |", "|---|---|---|---|---|---|---|---|"]

    def num(x, fmt):
        return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

    for r in rows:
        grad = ", ".join(f"{t} {num(v, '.3f')}" for t, v in r["gradient_vs_supervised"].items()) or "–"
        share = " / ".join(num(r["pseudo_label_share_vs_labeled"][n], ".2f") for n in names)
        kept_c = " / ".join(num(r["kept_by_gate_per_class"][n], ".2f") for n in names)
        lines.append(f"| {r['trainer']} | {r['labeled_amount']} | {grad} | {share} | {num(r['kept_by_gate'], '.2f')} "
                     f"| {kept_c} | {num(r['teacher_confidence'], '.3f')} | {num(r['teacher_disagreement'], '.4f')} |")
    return lines + [""]

"""When a two-stage copy-paste method (BCP, MPER) leaves labeled-only pre-training for self-training.

The papers switch after a fixed share of the run (BCP and MPER: 10k of 40k iterations on ACDC, 2k of 17k
on LA). In a short nnU-Net run that share can end before the student has learned every class; the
teacher is then reset to a student that never predicts, say, the right ventricle, and its pseudo labels
teach the class away for the rest of the run (observed for MPER and BCP on the ACDC CPU benchmark).

``stage_switch="ready"`` (our default) switches at the first epoch at which every foreground class
reached ``ready_dice`` in nnU-Net's validation pseudo-Dice on ``ready_epochs`` consecutive epochs, not
before ``min_pretrain_fraction`` of the run (floor) and at the latest at ``max_pretrain_fraction`` (cap).
At the cap without readiness the switch still happens, but the teacher is not reset to the unready
student (the EMA teacher of stage one continues), and the decision says so. ``"fixed"`` is the papers'
rule: at ``pretrain_fraction``. Pure logic: the trainer supplies nnU-Net's pseudo-Dice history.

Opt-in options (issue 23, item 6; not validated yet, the defaults keep today's behaviour):

* ``stage_switch="warm_start"``: no stage one. Stage two starts at the first epoch, with the teacher reset to
  the student as nnU-Net's ``-pretrained_weights`` loaded it (a plain nnU-Net checkpoint of the same plans).
* ``stage_one_loss``: ``"copy_paste"`` (default, the papers' labeled copy-paste) or ``"plain"`` (nnU-Net's own
  supervised loss with deep supervision on the un-mixed labeled batch, exactly what plain nnU-Net trains with).
* ``unmixed_supervised_weight`` w (default 0 = off): in stage two the student also predicts the un-mixed labeled
  patches (in the same forward as the mixed ones) and w · nnU-Net's loss on them is added, logged as the term
  ``unmixed`` (absent when w = 0).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

STAGE_SWITCHES = ("ready", "fixed", "warm_start")
#: stage-one supervised loss: the papers' labeled copy-paste, or nnU-Net's own loss on the un-mixed labeled batch
STAGE_ONE_LOSSES = ("copy_paste", "plain")
#: name of the loss term of nnU-Net's supervised loss on the un-mixed labeled patches in stage two
UNMIXED_TERM = "unmixed"


def epochs_for(fraction: float, num_epochs: int) -> int:
    """⌈fraction · num_epochs⌉ epochs, capped at num_epochs − 1 (stage two always runs)."""
    if num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
    return min(math.ceil(fraction * num_epochs - 1e-9), num_epochs - 1)


def validate_switch_config(cfg: Any) -> None:
    """Check the stage fields of a config (``stage_switch``, ``ready_dice``, ``ready_epochs``, the fractions,
    ``stage_one_loss``, ``unmixed_supervised_weight``)."""
    if cfg.stage_switch not in STAGE_SWITCHES:
        raise ValueError(f"stage_switch must be one of {STAGE_SWITCHES}, got {cfg.stage_switch!r}")
    if cfg.stage_one_loss not in STAGE_ONE_LOSSES:
        raise ValueError(f"stage_one_loss must be one of {STAGE_ONE_LOSSES}, got {cfg.stage_one_loss!r}")
    if cfg.stage_switch == "warm_start" and cfg.stage_one_loss != "copy_paste":
        raise ValueError(f"stage_switch='warm_start' skips stage one, so stage_one_loss={cfg.stage_one_loss!r} would "
                         f"never be used; leave stage_one_loss at 'copy_paste' or use another stage_switch")
    if not (math.isfinite(cfg.unmixed_supervised_weight) and cfg.unmixed_supervised_weight >= 0):
        raise ValueError(f"unmixed_supervised_weight must be a finite number >= 0 (0 = off), got "
                         f"{cfg.unmixed_supervised_weight}")
    if not 0.0 <= cfg.ready_dice <= 1.0:
        raise ValueError(f"ready_dice is a pseudo-Dice in [0, 1], got {cfg.ready_dice}")
    if cfg.ready_epochs < 1:
        raise ValueError(f"ready_epochs must be >= 1, got {cfg.ready_epochs}")
    if not 0.0 <= cfg.min_pretrain_fraction <= cfg.max_pretrain_fraction < 1.0:
        raise ValueError(f"need 0 <= min_pretrain_fraction <= max_pretrain_fraction < 1, got "
                         f"min_pretrain_fraction={cfg.min_pretrain_fraction}, "
                         f"max_pretrain_fraction={cfg.max_pretrain_fraction}")
    if cfg.pretrain_fraction is not None and not 0.0 <= cfg.pretrain_fraction < 1.0:
        raise ValueError(f"pretrain_fraction must be in [0, 1) or None (paper value), got {cfg.pretrain_fraction}")


def skips_stage_one(cfg: Any) -> bool:
    """Whether the run has no stage one (``stage_switch="warm_start"``)."""
    return cfg.stage_switch == "warm_start"


def stage_one_bounds(cfg: Any, num_epochs: int) -> Tuple[int, int]:
    """(first, last) epoch at which the readiness switch may / must start stage two (floor and cap); (0, 0) for the
    warm start."""
    if skips_stage_one(cfg):
        return 0, 0
    return epochs_for(cfg.min_pretrain_fraction, num_epochs), epochs_for(cfg.max_pretrain_fraction, num_epochs)


def switch_decision(cfg: Any, epoch: int, num_epochs: int, fixed_fraction: float,
                    history: Optional[Sequence[Sequence[float]]] = None) -> Optional[Dict[str, Any]]:
    """Whether stage two starts at the beginning of ``epoch``; None = not yet.

    Args:
        cfg: a config with the switch fields (``validate_switch_config``).
        epoch: the epoch about to start; num_epochs: epochs of the run.
        fixed_fraction: the stage-one share of the ``"fixed"`` rule (the paper's, or the config's).
        history: nnU-Net's per-foreground-class pseudo-Dice on its validation cases, one list per finished
            epoch, oldest first; None / empty before the first. Ready = every class ≥ ``ready_dice`` in each
            of the last ``ready_epochs`` entries (NaN, a class neither predicted nor present, is not ready).
    Returns: ``{"epoch", "reason", "reset_teacher", "pseudo_dice", "ready_dice", ...}`` where reason is
    ``"fixed"`` (paper schedule), ``"ready"`` (at or after the floor), ``"cap"`` (not ready at the cap:
    ``reset_teacher=False``, the stage-one EMA teacher continues) or ``"warm_start"`` (no stage one: at once,
    teacher reset to the warm-started student).
    """
    history = [[float(d) for d in entry] for entry in (history or [])]
    report: Dict[str, Any] = {"epoch": int(epoch), "pseudo_dice": history[-1] if history else [],
                              "ready_dice": cfg.ready_dice}
    if skips_stage_one(cfg):
        return {**report, "reason": "warm_start", "reset_teacher": True}
    if cfg.stage_switch == "fixed":
        if epoch >= epochs_for(fixed_fraction, num_epochs):
            return {**report, "reason": "fixed", "reset_teacher": True}
        return None
    floor, cap = stage_one_bounds(cfg, num_epochs)
    report.update(floor_epoch=floor, cap_epoch=cap, ready_epochs=cfg.ready_epochs)
    if epoch < floor:
        return None
    recent = history[-cfg.ready_epochs:]
    ready = len(recent) == cfg.ready_epochs and all(
        entry and all(math.isfinite(d) and d >= cfg.ready_dice for d in entry) for entry in recent)
    if ready:
        return {**report, "reason": "ready", "reset_teacher": True}
    if epoch >= cap:
        return {**report, "reason": "cap", "reset_teacher": False}
    return None


def with_unmixed_term(term_names: Tuple[str, ...], cfg: Any) -> Tuple[str, ...]:
    """A method's term names plus ``unmixed`` when ``unmixed_supervised_weight`` > 0 (absent when off)."""
    return (*term_names, UNMIXED_TERM) if cfg.unmixed_supervised_weight > 0 else tuple(term_names)


def unmixed_weight(cfg: Any, stage: int) -> Dict[str, float]:
    """``{"unmixed": w}`` in stage two, ``{"unmixed": 0}`` in stage one; ``{}`` when the option is off."""
    if cfg.unmixed_supervised_weight <= 0:
        return {}
    return {UNMIXED_TERM: float(cfg.unmixed_supervised_weight) if stage == 2 else 0.0}

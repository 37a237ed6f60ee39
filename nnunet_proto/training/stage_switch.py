"""Trainer side of the stage switch of the two-stage copy-paste trainers (BCP, MPER).

At the start of every stage-one epoch: read nnU-Net's validation pseudo-Dice history, ask the method
(``method.switch_decision``, see ``nnunet_proto/methods/stage_switch.py``) and either call the trainer's
``start_self_training(decision)`` or log where readiness stands.
"""
from __future__ import annotations

from typing import Optional, Sequence

from nnunet_proto.training.compat import pseudo_dice_history


def fmt_dice(dice: Optional[Sequence[float]]) -> str:
    return "none yet" if not dice else "[" + ", ".join(f"{d:.3f}" for d in dice) + "]"


def maybe_switch_stage(trainer, name: str) -> None:
    """Switch ``trainer`` to stage two now if its method says so; otherwise log the readiness (``name``: BCP, MPER)."""
    method, cfg = trainer.method, trainer.config
    if method.stage != 1:
        return
    history = pseudo_dice_history(trainer)
    decision = method.switch_decision(trainer.current_epoch, trainer.num_epochs, history)
    if decision is not None:
        trainer.start_self_training(decision)
    elif cfg.stage_switch == "ready":
        floor, cap = method.stage_one_bounds(trainer.num_epochs)
        trainer.print_to_log_file(
            f"{name} stage one at epoch {trainer.current_epoch}: validation pseudo-Dice per foreground class "
            f"{fmt_dice(history[-1] if history else None)}, switch when all >= {cfg.ready_dice:g} in "
            f"{cfg.ready_epochs} consecutive validations (epochs {floor}..{cap})")

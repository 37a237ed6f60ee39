"""Ramp-up and EMA-decay schedules, expressed as fractions of the whole training run.

The SSL literature counts ramps in iterations or in "epochs" of 150 iterations (docs/methods/README.md, 'Ramp-up');
nnU-Net runs far more iterations, so every schedule here takes ``progress`` = iteration / total
iterations in [0, 1] and a ramp length that is also a fraction of the run.
"""
from __future__ import annotations

import math


def _ramp_position(progress: float, length: float) -> float:
    if length <= 0:
        return 1.0
    return min(max(progress / length, 0.0), 1.0)


def sigmoid_rampup(progress: float, length: float) -> float:
    """Gaussian ("sigmoid") ramp-up exp(-5 (1 - t)^2), t = clip(progress / length, 0, 1).

    This is the curve of the CPCL and MSPA papers' λ(t) = w_max·exp(-5(1 - t/t_max)^2) and of
    SSL4MIS ``ramps.sigmoid_rampup``. Returns a value in (0, 1]; ``length <= 0`` means "no ramp" (1).
    """
    t = _ramp_position(progress, length)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def linear_rampup(progress: float, length: float) -> float:
    """Linear ramp from 0 to 1 over the first ``length`` fraction of training."""
    return _ramp_position(progress, length)


def ema_decay(step: int, decay: float, warmup: bool = True) -> float:
    """Effective EMA decay at optimiser step ``step`` (0-based).

    With warm-up (Mean Teacher / SSL4MIS): min(1 - 1/(step + 1), decay), so the teacher tracks the
    student closely while the student changes fast at the start.
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
    if not warmup:
        return decay
    return min(1.0 - 1.0 / (step + 1.0), decay)

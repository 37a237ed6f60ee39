"""Ramp-up and EMA-decay schedules, expressed as fractions of the whole training run.

The SSL literature counts ramps in iterations or in "epochs" of 150 iterations (SSL4MIS-derived code);
nnU-Net runs far more iterations, so every schedule here takes ``progress`` = iteration / total
iterations in [0, 1] and a ramp length that is also a fraction of the run. EMA and momentum decays are
rescaled to the run length by :func:`run_relative_decay` (docs/training_diagnostics.md).
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


#: Default floor of :func:`run_relative_decay`: horizon 1/(1 − 0.9) = 10 steps. Below ~10 steps an EMA
#: teacher is the student of a few steps ago (no temporal ensemble left, consistency ≈ 0), and a momentum
#: prototype bank is overwritten by every batch (pure batch noise). 10 steps keeps at least a short
#: ensemble on very short CPU runs (1000 steps → 1 % of the run), while real runs never reach the floor.
MIN_RUN_RELATIVE_DECAY = 0.9
#: Default ceiling: horizon 10⁵ steps. Longer horizons would freeze the teacher for any run nnU-Net does
#: (250k steps) once a paper decay is stretched to it; the ceiling only binds for reference lengths far
#: below the run length.
MAX_RUN_RELATIVE_DECAY = 0.99999


def ema_horizon(decay: float) -> float:
    """Horizon 1/(1 − decay) in steps of an EMA with the given decay (the mean age of its content)."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    return 1.0 / (1.0 - decay)


def run_relative_decay(decay: float, reference_steps: int, run_steps: int,
                       min_decay: float = MIN_RUN_RELATIVE_DECAY,
                       max_decay: float = MAX_RUN_RELATIVE_DECAY) -> float:
    """EMA / momentum decay whose horizon is the same fraction of this run as ``decay``'s was of the paper's.

    The horizon of an EMA with decay α is H = 1/(1 − α) steps. A paper that used α over
    ``reference_steps`` iterations kept H/reference_steps of its run in the average; to keep that
    fraction over ``run_steps``:

        α' = 1 − (1 − α) · reference_steps / run_steps       (H' = H · run_steps / reference_steps)

    clipped to [min(min_decay, α), max(max_decay, α)], so the result equals ``decay`` exactly when
    ``run_steps == reference_steps`` even if the paper value lies outside the default bounds. Examples:
    SSL4MIS Mean Teacher α = 0.99 over 30 000 steps → 0.9 (the floor) at 1000 steps, 0.9988 at 250 000.

    Args:
        decay: the paper's decay α in [0, 1).
        reference_steps: iterations of the paper's run (> 0).
        run_steps: iterations of this run (num_epochs × num_iterations_per_epoch, > 0).
        min_decay: floor (default 0.9 = a 10-step horizon, see ``MIN_RUN_RELATIVE_DECAY``).
        max_decay: ceiling < 1 (default 0.99999).
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    if reference_steps <= 0 or run_steps <= 0:
        raise ValueError(f"reference_steps and run_steps must be > 0, got {reference_steps} and {run_steps}")
    if not 0.0 <= min_decay <= max_decay < 1.0:
        raise ValueError(f"need 0 <= min_decay <= max_decay < 1, got min_decay={min_decay}, max_decay={max_decay}")
    if run_steps == reference_steps:
        return float(decay)
    scaled = 1.0 - (1.0 - decay) * reference_steps / run_steps
    return float(min(max(scaled, min(min_decay, decay)), max(max_decay, decay)))


def run_fraction(steps: float, reference_steps: int) -> float:
    """A paper's step count (stage switch, ramp length) as a fraction of the paper's run, clipped to [0, 1].

    E.g. a ramp over 40 "epochs" of 150 iterations in a 30 000-iteration run → 0.2, which the trainers
    then apply to their own run (``progress`` in [0, 1]) so the ramp covers the same share of any run.
    """
    if reference_steps <= 0:
        raise ValueError(f"reference_steps must be > 0, got {reference_steps}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    return float(min(steps / reference_steps, 1.0))


def fraction_to_steps(fraction: float, run_steps: int, min_steps: int = 0) -> int:
    """The step at which a fraction of a ``run_steps``-step run is reached: round(fraction · run_steps).

    ``min_steps`` is a floor (e.g. at least one epoch before a stage switch); the result never exceeds
    ``run_steps``.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if run_steps <= 0:
        raise ValueError(f"run_steps must be > 0, got {run_steps}")
    return int(min(max(round(fraction * run_steps), min_steps), run_steps))


#: ``weight_band`` adaptation: the share of the log-space way to the band taken per probe, the largest factor one
#: probe may change a gain by, and the bounds of a gain
BAND_RATE = 0.5
BAND_MAX_STEP = 4.0
BAND_GAIN_BOUNDS = (1e-3, 1e3)


def banded_gain(gain: float, ratio: float, full_weight: float, band: tuple, rate: float = BAND_RATE,
                max_step: float = BAND_MAX_STEP, bounds: tuple = BAND_GAIN_BOUNDS) -> float:
    """The next gain of a loss term's weight so that its gradient share at full ramp moves into ``band``.

    ``ratio`` = ‖∇L_term‖ / ‖∇L_sup‖ measured by the gradient probe (unweighted), ``full_weight`` the term's
    weight at full ramp without gain, so the share at full ramp is s = gain · full_weight · ratio. Inside
    ``band`` = (lo, hi) the gain is kept; outside, the target gain g* puts s on the band's geometric middle
    √(lo · hi) (a bound itself would only be approached, never entered) and the gain moves ``rate`` of the way there
    in log space (gain^(1 − rate) · g*^rate: one probe per epoch is one batch, so a single noisy probe does not set
    the weight), by at most a factor ``max_step``, within ``bounds``. A term without
    gradient (ratio 0 or not finite) or without weight keeps its gain.
    """
    lo, hi = band
    if not (ratio > 0 and math.isfinite(ratio)) or full_weight <= 0:
        return gain
    share = gain * full_weight * ratio
    if lo <= share <= hi:
        return gain
    target = math.sqrt(lo * hi) / (full_weight * ratio)
    new = math.exp((1.0 - rate) * math.log(gain) + rate * math.log(target))
    new = min(max(new, gain / max_step), gain * max_step)
    return float(min(max(new, bounds[0]), bounds[1]))

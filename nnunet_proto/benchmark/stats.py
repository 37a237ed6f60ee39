"""Paired statistics of a trainer against plain nnU-Net: a hierarchical bootstrap over seeds and test cases.

Why hierarchical: one training run is one draw from the run-to-run distribution. At CPU budgets,
repeating the same plain nnU-Net command moved its test Dice by several points, so a test over the
test cases of single runs (Wilcoxon) measures those runs, not the method. Resampling seeds first and
then the test cases within each drawn seed makes the run-to-run spread part of the interval
(cluster bootstrap: Davison & Hinkley, "Bootstrap Methods and their Application", CUP 1997, sec. 3.8;
Field & Welsh, "Bootstrapping clustered data", J. R. Stat. Soc. B 69(3), 2007).

Caveats written into the report: with one seed, the seed level cannot be resampled and the interval
covers case-to-case variation only; with few seeds (e.g. 3) the seed level is resampled from 3
values, so the interval is somewhat too narrow (the bootstrap variance of a mean of S clusters is
(S-1)/S of the usual estimate).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_RNG_SEED = 12345  # fixed: the report is reproducible bit for bit from the run folders
CI_LEVEL = 0.95
P_VALUE_TEXT = ("two-sided bootstrap p = min(1, 2 · min(#{Δ* ≤ 0} + 1, #{Δ* ≥ 0} + 1) / (B + 1)) over the B "
                "resampled Δ*: twice the share of resamples on the far side of 0 (with the +1 correction "
                "that keeps p > 0), so p < 0.05 exactly when 0 lies outside the central 95 % percentile "
                "interval, up to the resolution 1/B")


@dataclass(frozen=True)
class BootstrapResult:
    """Δ (mean over seeds of the per-seed mean paired difference), its percentile CI and two-sided p."""

    delta: float
    ci_low: float
    ci_high: float
    p: float
    n_seeds: int
    n_pairs: int
    resamples: int

    def contains(self, value: float) -> bool:
        return self.ci_low <= value <= self.ci_high

    def as_dict(self) -> dict:
        return asdict(self)


def hierarchical_bootstrap(diffs_per_seed: Sequence[Sequence[float]], resamples: int = BOOTSTRAP_RESAMPLES,
                           rng_seed: int = BOOTSTRAP_RNG_SEED, level: float = CI_LEVEL,
                           chunk: int = 1000) -> BootstrapResult:
    """Two-level (seeds, then test cases within seed) percentile bootstrap of a mean paired difference.

    Args:
        diffs_per_seed: per seed, the paired differences d_{s,i} = trainer − plain on test case i of the
            runs with seed s (same fold, same cases). NaN entries (undefined metric) are dropped; seeds
            left empty are dropped.
        resamples: B, the number of bootstrap resamples.
        rng_seed: seed of numpy's default_rng (fixed, so the report is reproducible).
        level: two-sided confidence level of the percentile interval.
        chunk: resamples drawn per vectorised block (bounds memory at chunk · S · max n_s indices).

    Returns:
        Δ = (1/S) Σ_s mean_i d_{s,i} (every seed weighs the same), the percentile interval of Δ* and the
        two-sided p (see P_VALUE_TEXT). One resample Δ*_b: draw S seeds with replacement from the S
        seeds; for each drawn seed draw its n_s differences with replacement; Δ*_b = mean over the S
        draws of their means.

    Raises:
        ValueError: no finite difference at all, or resamples < 1, or level outside (0, 1).
    """
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"need resamples >= 1 and 0 < level < 1, got {resamples} and {level}")
    seeds = [a[~np.isnan(a)] for a in (np.asarray(d, dtype=float).ravel() for d in diffs_per_seed)]
    seeds = [a for a in seeds if a.size]
    if not seeds:
        raise ValueError("no finite paired difference to bootstrap (no pairs, or every value undefined)")
    n_seeds = len(seeds)
    delta = float(np.mean([a.mean() for a in seeds]))
    rng = np.random.default_rng(rng_seed)
    boot = np.empty(resamples)
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        pick = rng.integers(0, n_seeds, size=(b, n_seeds))  # level 1: which seeds
        means = np.empty((b, n_seeds))
        for s, d in enumerate(seeds):
            where = pick == s
            k = int(where.sum())
            if k:  # level 2: an independent case resample for every time seed s was drawn
                means[where] = d[rng.integers(0, d.size, size=(k, d.size))].mean(axis=1)
        boot[start:start + b] = means.mean(axis=1)
    alpha = 1 - level
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    tail = min(int((boot <= 0).sum()), int((boot >= 0).sum()))
    p = min(1.0, 2 * (tail + 1) / (resamples + 1))
    return BootstrapResult(delta, float(low), float(high), float(p), n_seeds, int(sum(a.size for a in seeds)),
                           resamples)


def wilcoxon_p(differences: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p (scipy) over pooled (case, seed) differences; 1.0 if all are 0.

    For reference only: it treats the pairs as independent, so it ignores run-to-run variance.
    """
    from scipy.stats import wilcoxon

    d, trivial = _differences_or_trivial_p(differences)
    return trivial if trivial is not None else float(wilcoxon(d, zero_method="wilcox").pvalue)


def _differences_or_trivial_p(values: Sequence[float]) -> Tuple[np.ndarray, Optional[float]]:
    """The non-NaN values, and the p a two-sided test of them against 0 has without computing: NaN for fewer
    than 2 values, 1.0 when all are 0 (None otherwise)."""
    d = np.asarray(values, dtype=float)
    d = d[~np.isnan(d)]
    if d.size < 2:
        return d, math.nan
    return d, (1.0 if np.allclose(d, 0) else None)


def seed_t_test_p(seed_deltas: Sequence[float]) -> float:
    """Two-sided one-sample t-test p (scipy) of the per-seed mean differences against 0: the seed-level test.

    Each seed's Δ is one observation, so with S seeds it has S − 1 degrees of freedom. With 3 seeds it is
    the conservative companion of the hierarchical bootstrap, whose seed level is resampled from only 3 values
    (too narrow). NaN with fewer than 2 seeds; 1.0 when every Δ is 0; 0.0 when all equal a nonzero value.
    """
    from scipy.stats import ttest_1samp

    d, trivial = _differences_or_trivial_p(seed_deltas)
    if trivial is not None:
        return trivial
    if np.allclose(d, d[0]):
        return 0.0
    return float(ttest_1samp(d, 0.0).pvalue)


#: the effect the issue's target asks for (+3 Dice points), as a fraction; the power section sizes seeds for it
TARGET_EFFECT = 0.03


def seeds_for_power(sd: float, effect: float = TARGET_EFFECT, alpha: float = 0.05, power: float = 0.8) -> float:
    """Seeds S a paired comparison needs so that a true mean difference ``effect`` is detected with probability
    ``power`` by a two-sided test at level ``alpha``, when the per-seed differences (each seed's mean over the
    test cases) spread with standard deviation ``sd``: S = ((z_{1−α/2} + z_power) · sd / effect)², rounded up.

    The normal approximation ignores that sd itself is estimated from a few seeds (a t-based size is larger),
    so read S as a lower bound. NaN when sd is NaN; 1 when sd is 0.
    """
    if not effect > 0 or not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError(f"need effect > 0, 0 < alpha < 1 and 0 < power < 1, got {effect}, {alpha}, {power}")
    if math.isnan(sd):
        return math.nan
    from scipy.stats import norm

    z = norm.ppf(1 - alpha / 2) + norm.ppf(power)
    return float(max(1, math.ceil((z * sd / effect) ** 2 - 1e-9)))

"""Prediction entropy and entropy-based prototype weights (PCCS, docs/methods/pccs.md).

Everything is float32 with autocast disabled and an eps inside the log, so that one-hot (zero-entropy)
probabilities give finite values and finite gradients (the code's ``m log m`` without eps gives 0·log 0).
"""
from __future__ import annotations

import torch

#: eps inside log(p + eps); the PCCS code's value for the pixel entropy map
ENTROPY_EPS = 1e-8
WEIGHTINGS = ("entropy", "confidence")


def entropy(probs: torch.Tensor, dim: int = 1, eps: float = ENTROPY_EPS, keepdim: bool = False) -> torch.Tensor:
    """Shannon entropy ``H = −Σ_c p_c log(p_c + eps)`` along ``dim`` (nats), float32.

    ``probs`` is e.g. ``(B, C, *spatial)`` softmax output or ``(P, C)`` mean probabilities. Gradient
    flows into ``probs`` unless the caller detaches it; at p = 0 the derivative is log(eps), finite.
    """
    if eps <= 0:
        raise ValueError(f"entropy eps must be > 0 (0 gives 0·log 0 = NaN), got {eps}")
    with torch.autocast(device_type=probs.device.type, enabled=False):
        p = probs.float()
        return -(p * torch.log(p + eps)).sum(dim=dim, keepdim=keepdim)


def uncertainty_weights(uncertainty: torch.Tensor, valid: torch.Tensor, weighting: str = "entropy",
                        detach: bool = True) -> torch.Tensor:
    """Per-prototype weights ``w_i = softmax_i(± u_i)`` over the valid rows (PCCS L_contra), 0 on the others.

    Args:
        uncertainty: ``(P,)`` prototype uncertainties u_i (entropy of the prototype's mean probabilities).
        valid: ``(P,)`` bool, rows that take part (e.g. prototypes with at least one positive).
        weighting: ``"entropy"``: w ∝ exp(u), higher-entropy prototypes weigh more (what the PCCS code
            runs, docs/methods/pccs.md 'Deviations'); ``"confidence"``: w ∝ exp(−u), what the code's comment describes.
        detach: detach u (default, our choice: docs/methods/pccs.md) so the weights are constants of the loss.
    Returns: ``(P,)`` float32 weights summing to 1 over the valid rows; all zeros if no row is valid.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    with torch.autocast(device_type=uncertainty.device.type, enabled=False):
        u = uncertainty.float()
        if detach:
            u = u.detach()
        score = u if weighting == "entropy" else -u
        # invalid rows get -inf; if no row is valid, use 0 everywhere (finite softmax) and zero it below
        score = score.masked_fill(~valid, float("-inf")).masked_fill(~valid.any(), 0.0)
        return torch.softmax(score, dim=0) * valid.float()

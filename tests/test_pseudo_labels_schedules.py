"""Unit tests of run-relative time constants (ops/schedules.py) and gated pseudo labels (ops/pseudo_labels.py)."""
import math

import pytest
import torch

from nnunet_proto.ops.pseudo_labels import (
    class_relative_thresholds,
    class_shares,
    confidence_gate,
    gate_logits,
    gate_pseudo_labels,
    pseudo_label_stat_names,
    pseudo_label_stats,
)
from nnunet_proto.ops.schedules import (
    MIN_RUN_RELATIVE_DECAY,
    ema_horizon,
    fraction_to_steps,
    run_fraction,
    run_relative_decay,
)


@pytest.mark.parametrize("decay,ref", [(0.99, 30000), (0.999, 40000), (0.9999, 30000), (0.5, 10)])
def test_run_relative_decay_is_the_paper_value_at_the_paper_run_length(decay, ref):
    assert run_relative_decay(decay, ref, ref) == decay


def test_run_relative_decay_keeps_the_horizon_fraction_of_the_run():
    # 0.99 over 30k steps: horizon 100 = 1/300 of the run; over 300k steps the horizon must be 1000
    d = run_relative_decay(0.99, 30000, 300000)
    assert ema_horizon(d) == pytest.approx(1000.0)
    d = run_relative_decay(0.999, 30000, 15000)  # horizon 1000 -> 500
    assert ema_horizon(d) == pytest.approx(500.0)


def test_run_relative_decay_floor_and_ceiling():
    assert run_relative_decay(0.99, 30000, 1000) == MIN_RUN_RELATIVE_DECAY  # 1 - 0.3 = 0.7 -> floor 0.9
    assert run_relative_decay(0.99, 30000, 1000, min_decay=0.5) == pytest.approx(0.7)
    assert run_relative_decay(0.99, 100, 10 ** 9) == 0.99999
    # a paper value outside the default bounds is never clipped at the paper's own run length, and the
    # bounds never move the value past the paper's one
    assert run_relative_decay(0.8, 100, 50) == 0.8
    assert run_relative_decay(0.999999, 100, 200) == 0.999999
    assert ema_horizon(MIN_RUN_RELATIVE_DECAY) == pytest.approx(10.0)


@pytest.mark.parametrize("bad", [dict(decay=1.0), dict(reference_steps=0), dict(run_steps=-1),
                                 dict(min_decay=0.99, max_decay=0.9)])
def test_run_relative_decay_rejects_bad_input(bad):
    args = dict(decay=0.99, reference_steps=100, run_steps=100)
    args.update(bad)
    with pytest.raises(ValueError):
        run_relative_decay(**args)


def test_run_fraction_and_steps():
    assert run_fraction(40 * 150, 30000) == pytest.approx(0.2)
    assert run_fraction(50000, 30000) == 1.0
    assert fraction_to_steps(0.2, 1000) == 200
    assert fraction_to_steps(0.0, 1000, min_steps=50) == 50
    assert fraction_to_steps(1.0, 1000, min_steps=5000) == 1000
    with pytest.raises(ValueError):
        fraction_to_steps(1.5, 1000)


@pytest.mark.parametrize("spatial", [(5, 6), (3, 4, 5)])
def test_gate_keeps_only_confident_voxels_per_predicted_class(spatial):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, *spatial, generator=g) * 3
    probs = torch.softmax(logits, 1)
    thr = torch.tensor([0.9, 0.5, 0.7])
    pl = gate_pseudo_labels(probs, thr, ignore_index=-100)
    assert pl.labels.shape == (2, 1, *spatial) and pl.labels.dtype == torch.long
    assert pl.keep.dtype == torch.bool and pl.confidence.dtype == torch.float32
    torch.testing.assert_close(pl.labels[:, 0], probs.argmax(1))
    torch.testing.assert_close(pl.confidence[:, 0], probs.max(1).values)
    expected = probs.max(1).values >= thr[probs.argmax(1)]
    assert torch.equal(pl.keep[:, 0], expected)
    assert 0 < pl.keep.sum() < pl.keep.numel()  # the test means something
    gated = pl.gated()
    assert (gated[~pl.keep] == -100).all() and torch.equal(gated[pl.keep], pl.labels[pl.keep])
    # threshold 0 = ungated argmax; same result from logits
    assert gate_pseudo_labels(probs, 0.0).keep.all()
    assert torch.equal(gate_logits(logits, thr).keep, pl.keep)


def test_gate_is_detached_and_checks_its_input():
    probs = torch.softmax(torch.randn(1, 2, 4, 4, requires_grad=True), 1)
    pl = gate_pseudo_labels(probs, 0.6)
    assert not pl.confidence.requires_grad
    with pytest.raises(ValueError, match="shape"):
        gate_pseudo_labels(probs, torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        gate_pseudo_labels(probs, 1.5)
    with pytest.raises(ValueError, match="ignore_index"):
        pl.gated()


def test_pseudo_label_stats_analytic():
    # 4 voxels: class 0 conf .9, class 1 conf .6, class 1 conf .95, class 2 conf .8; threshold .7
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.3, 0.6, 0.1], [0.03, 0.95, 0.02], [0.1, 0.1, 0.8]])
    probs = probs.t().reshape(1, 3, 2, 2)
    pl = gate_pseudo_labels(probs, 0.7)
    stats = pseudo_label_stats(pl, 3)
    assert tuple(stats) == pseudo_label_stat_names(3)
    assert [float(stats[f"share_c{c}"]) for c in range(3)] == pytest.approx([0.25, 0.5, 0.25])
    assert [float(stats[f"share_kept_c{c}"]) for c in range(3)] == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    assert float(stats["confidence"]) == pytest.approx((0.9 + 0.6 + 0.95 + 0.8) / 4)
    assert float(stats["kept"]) == pytest.approx(0.75)
    assert [float(stats[f"threshold_c{c}"]) for c in range(3)] == pytest.approx([0.7] * 3)
    none_kept = pseudo_label_stats(gate_pseudo_labels(probs, 0.99), 3)
    assert all(float(none_kept[f"share_kept_c{c}"]) == 0.0 for c in range(3))
    assert not any(math.isnan(float(v)) for v in none_kept.values())


def test_class_shares_skip_ignore_label():
    labels = torch.tensor([[[0, 1], [1, 9]]])  # 9 = ignore label, not a class
    torch.testing.assert_close(class_shares(labels, 3), torch.tensor([1 / 3, 2 / 3, 0.0]))


def test_class_relative_thresholds_keep_a_hard_class():
    # class 0: 6 voxels at 0.95; class 1 (hard): 4 voxels at 0.6; class 2 never predicted
    conf = torch.tensor([0.95] * 6 + [0.6] * 4)
    labels = torch.tensor([0] * 6 + [1] * 4)
    probs = torch.zeros(1, 3, 10)
    probs[0, labels, torch.arange(10)] = conf
    probs[0, 2] = 1 - conf  # the rest of the mass on class 2 (never the argmax)
    thr = class_relative_thresholds(probs, 0.9)
    torch.testing.assert_close(thr, torch.tensor([0.9, 0.9 * 0.6 / 0.95, 0.9]))
    assert float(class_relative_thresholds(probs, 0.9, floor=0.7)[1]) == pytest.approx(0.7)
    fixed = pseudo_label_stats(confidence_gate(probs, 0.9, "fixed"), 3)
    relative = pseudo_label_stats(confidence_gate(probs, 0.9, "class_relative"), 3)
    assert float(fixed["share_kept_c1"]) == 0.0  # the hard class vanishes under a fixed gate ...
    assert float(relative["share_kept_c1"]) == pytest.approx(0.4)  # ... and is kept relative to its status
    assert float(relative["threshold_c1"]) == pytest.approx(0.9 * 0.6 / 0.95)  # logged per class
    with pytest.raises(ValueError, match="threshold mode"):
        confidence_gate(probs, 0.9, "adaptive")
    with pytest.raises(ValueError, match="floor"):
        class_relative_thresholds(probs, 0.4, floor=0.5)

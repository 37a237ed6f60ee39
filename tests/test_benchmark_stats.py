"""Benchmark statistics and report on hand-made results: hierarchical bootstrap, A/A control, postprocessing."""
import dataclasses
import json
import math
import shutil

import numpy as np
import pytest

from nnunet_proto.benchmark.report import portable, write_report
from nnunet_proto.benchmark.results import OLD_RUN_REASON, Results
from nnunet_proto.benchmark.sections import validation_agreement
from nnunet_proto.benchmark.spec import CONTROL, PLAIN, BenchmarkSpec, Run, run_finished
from nnunet_proto.benchmark.stats import (
    BOOTSTRAP_RESAMPLES,
    hierarchical_bootstrap,
    seed_t_test_p,
    seeds_for_power,
    wilcoxon_p,
)

# ---------------------------------------------------------------------------------------------- bootstrap


def test_constant_shift_gives_a_ci_at_the_shift_and_the_smallest_p():
    r = hierarchical_bootstrap([np.full(20, 0.05), np.full(20, 0.05), np.full(20, 0.05)])
    assert r.delta == pytest.approx(0.05) and r.ci_low == pytest.approx(0.05) and r.ci_high == pytest.approx(0.05)
    assert r.p == pytest.approx(2 / (BOOTSTRAP_RESAMPLES + 1))  # no resample on the far side of 0
    assert (r.n_seeds, r.n_pairs) == (3, 60)
    neg = hierarchical_bootstrap([np.full(20, -0.05)] * 3)
    assert neg.p == r.p and neg.ci_high == pytest.approx(-0.05)


def test_identical_runs_give_p_one_and_a_ci_containing_zero():
    r = hierarchical_bootstrap([np.zeros(20)] * 3)
    assert r.p == 1.0 and r.contains(0.0) and r.delta == 0.0


def test_noisy_shift_ci_contains_truth_and_is_reproducible():
    rng = np.random.default_rng(1)
    diffs = [rng.normal(0.04, 0.05, 40) for _ in range(4)]
    a, b = hierarchical_bootstrap(diffs), hierarchical_bootstrap(diffs)
    assert a == b  # fixed RNG seed: the report is reproducible
    assert a.ci_low < 0.04 < a.ci_high and a.ci_low > 0 and a.p < 0.01


def test_resampling_respects_seeds():
    """Seed 0 wins every case by 1, seed 1 loses every case by 1: the method effect is pure run-to-run noise.
    Pooling the cases would give a tight interval around 0; resampling seeds first gives Δ* in {-1, 0, +1}."""
    r = hierarchical_bootstrap([np.ones(50), -np.ones(50)])
    assert r.delta == 0.0 and r.ci_low == pytest.approx(-1.0) and r.ci_high == pytest.approx(1.0) and r.p == 1.0
    # a consistent gain across seeds with different sizes: every seed-level resample stays positive
    r = hierarchical_bootstrap([np.full(50, 0.02), np.full(50, 0.10)])
    assert r.delta == pytest.approx(0.06) and r.ci_low == pytest.approx(0.02) and r.ci_high == pytest.approx(0.10)


def test_one_seed_is_the_case_bootstrap():
    rng = np.random.default_rng(2)
    d = rng.normal(0.0, 1.0, 400)
    r = hierarchical_bootstrap([d])
    half = 1.96 * d.std(ddof=1) / math.sqrt(d.size)  # normal-theory half width of the mean's 95 % CI
    assert (r.ci_high - r.ci_low) / 2 == pytest.approx(half, rel=0.1)


def test_undefined_values_are_dropped_and_nothing_is_an_error():
    r = hierarchical_bootstrap([np.array([0.1, np.nan, 0.1]), np.array([np.nan])])
    assert r.n_seeds == 1 and r.n_pairs == 2 and r.delta == pytest.approx(0.1)
    with pytest.raises(ValueError, match="no finite paired difference"):
        hierarchical_bootstrap([np.array([np.nan])])
    assert wilcoxon_p([0.0, 0.0, 0.0]) == 1.0 and math.isnan(wilcoxon_p([0.1]))


# ---------------------------------------------------------------------------------------------- report

CLASSES = {"1": "RV", "2": "MYO"}


def _write_run(root, trainer, amount, seed, dice, pp_dice=None, pp_status=None, empty_class2=0, sec=0.1, val=0.5):
    """One finished run folder: per-case Dice (both classes alike) and, optionally, post-processed metrics."""
    d = root / "runs" / Run(trainer, amount, seed, 0).tag
    d.mkdir(parents=True)

    def metrics(values):
        per_case = []
        for i, v in enumerate(values):
            m = {lab: {"Dice": v, "IoU": v / (2 - v), "HD95": 10 * (1 - v), "ASD": 1 - v, "rule": "both_present"}
                 for lab in CLASSES}
            if i < empty_class2:  # the prediction misses class 2 on this case
                m["2"] = {"Dice": 0.0, "IoU": 0.0, "HD95": 100.0, "ASD": 50.0, "rule": "prediction_empty"}
            per_case.append({"case": f"c{i}", "metrics": m})
        return {"metric_per_case": per_case, "mean": {k: {"name": n} for k, n in CLASSES.items()}}

    (d / "metrics.json").write_text(json.dumps(metrics(dice)))
    (d / "run_info.json").write_text(json.dumps({"seconds_per_iteration_median": sec, "seconds_per_epoch_median":
                                                 sec * 10, "validation_foreground_dice": val}))
    if pp_status is not None:
        (d / "postprocessing.json").write_text(json.dumps(pp_status))
    elif pp_dice is not None:
        (d / "metrics_postprocessed.json").write_text(json.dumps(metrics(pp_dice)))
        (d / "postprocessing.json").write_text(json.dumps({
            "available": True, "steps": [{"function": "remove_all_but_largest_component_from_segmentation",
                                          "kwargs": {"labels_or_regions": [1, 2]}}],
            "validation_dice_before": 0.5, "validation_dice_after": 0.55}))
    return d


def _bench(tmp_path, trainers, shifts, seeds=(0, 1, 2), n=12, pp=True, **kw):
    spec = BenchmarkSpec(dataset="1", configuration="2d", plans="p", trainers=tuple(trainers), amounts=("2",),
                         seeds=tuple(seeds), test_images=".", test_labels=".", epochs=2, iterations_per_epoch=5, **kw)
    runs = [{"trainer": t, "amount": "2", "seed": s, "fold": 5 + s} for s in seeds for t in spec.all_trainers]
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    rng = np.random.default_rng(0)
    for s in seeds:
        plain = np.clip(rng.uniform(0.4, 0.7, n) + 0.03 * s, 0, 1)
        for t in spec.all_trainers:
            shift = shifts.get(t, 0.0)
            dice = np.clip(plain + (shift(s) if callable(shift) else shift), 0, 1)
            _write_run(tmp_path, t, "2", s, list(dice), pp_dice=list(np.clip(dice + 0.02, 0, 1)) if pp else None,
                       sec=0.1 if t == PLAIN else 0.25, val=0.5 + 0.01 * s + (0.1 if t.endswith("X") else 0))
    return spec


def test_report_rows_control_and_summary_json(tmp_path):
    spec = _bench(tmp_path, ["nnUNetTrainerX"], {"nnUNetTrainerX": 0.05})
    assert spec.all_trainers == (PLAIN, CONTROL, "nnUNetTrainerX")
    readme = write_report(spec, tmp_path, tmp_path / "report")
    text = readme.read_text()
    assert "WARNING" not in text and "matches plain (CI contains 0)" in text
    for section in ("## Against plain nnU-Net", "## A/A control", "## No class lost", "hierarchical bootstrap",
                    "after nnU-Net's postprocessing", "## Postprocessing", "largest component of RV, MYO"):
        assert section in text
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["statistics"]["resamples"] == BOOTSTRAP_RESAMPLES and summary["total_steps_per_run"] == 10
    assert summary["precision"] == "fp32"
    rows = {r["trainer"]: r for r in summary["comparisons"]}
    x = rows["nnUNetTrainerX"]
    assert x["labeled_amount"] == "2" and x["seeds"] == [0, 1, 2] and x["total_steps_per_run"] == 10
    assert x["s_per_step_vs_plain"] == pytest.approx(2.5)
    assert x["validation_dice"] == pytest.approx(0.61) and x["plain_validation_dice"] == pytest.approx(0.51)
    assert [r["trainer"] for r in summary["validation_ranking"]["2"]] == ["nnUNetTrainerX"]  # control excluded
    for kind in ("raw", "postprocessed"):
        r = x[kind]
        assert r["n_pairs"] == 36 and r["dice_delta"] == pytest.approx(0.05)
        assert r["dice_ci95"][0] == pytest.approx(0.05) and r["p_bootstrap"] < 0.001 and r["p_wilcoxon"] < 0.001
        assert r["wins"] == 36 and r["losses"] == 0 and r["hd95_delta"] == pytest.approx(-0.5)
        assert r["per_class_dice"]["RV"]["delta"] == pytest.approx(0.05)
    assert rows[CONTROL]["is_control"] and rows[CONTROL]["raw"]["p_bootstrap"] == 1.0
    assert summary["control"]["ok"] is True and summary["class_presence"]["ok"] is True
    assert summary["runs"]["without_postprocessing"] == []
    assert (tmp_path / "report" / "paired_difference.png").stat().st_size > 1000


def test_seeds_for_power():
    # ((1.96 + 0.84) * sd / effect)^2: sd = effect -> 7.85 -> 8 seeds; sd = 2 * effect -> 31.4 -> 32
    assert seeds_for_power(0.03) == 8 and seeds_for_power(0.06) == 32 and seeds_for_power(0.0) == 1
    assert seeds_for_power(0.01, effect=0.01, power=0.5) == 4  # z_0.975 + z_0.5 = 1.96 -> 3.84 -> 4
    assert math.isnan(seeds_for_power(math.nan))
    with pytest.raises(ValueError, match="effect > 0"):
        seeds_for_power(0.03, effect=0)


def test_seed_t_test_p():
    assert seed_t_test_p([0.01, 0.04, 0.07]) == pytest.approx(0.1472, abs=1e-4)
    assert seed_t_test_p([-0.01, -0.04, -0.07]) == pytest.approx(0.1472, abs=1e-4)  # two-sided
    assert seed_t_test_p([0.017, 0.017, 0.031]) < 0.05 < seed_t_test_p([0.105, -0.012, 0.071])
    assert seed_t_test_p([0.0, 0.0, 0.0]) == 1.0 and seed_t_test_p([0.02, 0.02]) == 0.0
    assert math.isnan(seed_t_test_p([0.02])) and math.isnan(seed_t_test_p([0.02, math.nan]))


def test_report_shows_each_seeds_delta_and_the_seeds_a_target_effect_needs(tmp_path):
    # per-seed shifts +0.01, +0.04, +0.07: sd over seeds 0.03 -> 8 seeds for a 3-point effect
    spec = _bench(tmp_path, ["nnUNetTrainerX"], {"nnUNetTrainerX": lambda s: 0.01 + 0.03 * s}, control=None)
    text = write_report(spec, tmp_path, tmp_path / "report").read_text()
    assert "## Run-to-run spread and power" in text
    # seed-level t-test: mean 0.04, sd 0.03, 3 seeds -> t = 2.31, 2 degrees of freedom, two-sided p 0.147
    assert "| 2 | nnUNetTrainerX | raw | s0 +1.0, s1 +4.0, s2 +7.0 | 3.0 | 0.15 | 8 |" in text
    x = json.loads((tmp_path / "report" / "summary.json").read_text())["comparisons"][0]
    sp = x["raw"]["seed_spread"]
    assert sp["seed_deltas"] == {"0": pytest.approx(0.01), "1": pytest.approx(0.04), "2": pytest.approx(0.07)}
    assert sp["sd_over_seeds"] == pytest.approx(0.03) and sp["seeds_for_target"] == 8
    assert sp["p_t_over_seeds"] == pytest.approx(0.1472, abs=1e-4)
    (tmp_path / "one").mkdir()
    one = _bench(tmp_path / "one", ["nnUNetTrainerX"], {}, seeds=(0,), control=None)
    assert "Needs at least two seeds" in write_report(one, tmp_path / "one", tmp_path / "one" / "r").read_text()


def test_control_that_differs_from_plain_raises_a_loud_warning(tmp_path):
    spec = _bench(tmp_path, [], {CONTROL: lambda s: -0.06 + 0.01 * s}, pp=False)
    text = write_report(spec, tmp_path, tmp_path / "report").read_text()
    assert "WARNING: the A/A control `nnUNetTrainerZeroSSL` does not match plain" in text
    assert "The glue has a defect" in text and "**DIFFERS from plain**" in text
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["control"]["ok"] is False
    # one seed: the CI holds no run-to-run variation, so a difference is a note, not a verdict on the glue
    (tmp_path / "one").mkdir()
    one = _bench(tmp_path / "one", [], {CONTROL: -0.06}, seeds=(0,), pp=False)
    text = write_report(one, tmp_path / "one", tmp_path / "one" / "r").read_text()
    assert "WARNING" not in text and "The glue has a defect" not in text
    assert "differs from plain nnU-Net at one seed" in text and "not conclusive" in text
    control = json.loads((tmp_path / "one" / "r" / "summary.json").read_text())["control"]
    assert control["ok"] is False and control["conclusive"] is False


def test_runs_without_postprocessing_are_missing_not_faked(tmp_path):
    spec = _bench(tmp_path, ["nnUNetTrainerX"], {"nnUNetTrainerX": 0.05}, control=None)
    plain0 = tmp_path / "runs" / Run(PLAIN, "2", 0, 0).tag
    for f in ("metrics_postprocessed.json", "postprocessing.json"):
        (plain0 / f).unlink()
    (plain0 / "postprocessing.json").write_text(json.dumps({"available": False, "reason": "no validation "
                                                            "predictions (run with --no-validation)"}))
    x2 = tmp_path / "runs" / Run("nnUNetTrainerX", "2", 2, 0).tag
    for f in ("metrics_postprocessed.json", "postprocessing.json"):  # as left by the code before this stage
        (x2 / f).unlink()
    assert not run_finished(x2) and run_finished(tmp_path / "runs" / Run("nnUNetTrainerX", "2", 1, 0).tag)
    res = Results(spec, tmp_path)
    assert res.pp_status[("nnUNetTrainerX", "2", 2)]["reason"] == OLD_RUN_REASON
    text = write_report(spec, tmp_path, tmp_path / "report").read_text()
    assert "2 run(s) without post-processed numbers" in text and "--no-validation" in text
    assert "(some runs lack post-processed metrics)" in text
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    x = summary["comparisons"][0]
    assert x["raw"]["seeds"] == [0, 1, 2] and x["postprocessed"]["seeds"] == [1]  # only seed 1 has both
    assert {(m["trainer"], m["seed"]) for m in summary["runs"]["without_postprocessing"]} == \
        {(PLAIN, 0), ("nnUNetTrainerX", 2)}
    assert summary["control"]["trainer"] is None and "No A/A control" in text


def test_no_postprocessing_at_all_marks_the_rows_missing(tmp_path):
    spec = _bench(tmp_path, ["nnUNetTrainerX"], {}, seeds=(0,), control=None, pp=False)
    text = write_report(spec, tmp_path, tmp_path / "report").read_text()
    assert "missing: no post-processed metrics" in text and "One seed only" in text
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert "missing" in summary["comparisons"][0]["postprocessed"]


def test_class_presence_flags_a_lost_class(tmp_path):
    spec = _bench(tmp_path, ["nnUNetTrainerX"], {}, seeds=(0,), control=None, pp=False)
    d = tmp_path / "runs" / Run("nnUNetTrainerX", "2", 0, 0).tag
    import shutil

    shutil.rmtree(d)
    _write_run(tmp_path, "nnUNetTrainerX", "2", 0, [0.5] * 10, empty_class2=2)  # class 2 missed on 2 of 10
    res = Results(spec, tmp_path)
    pres = res.class_presence("nnUNetTrainerX", "2")
    assert pres["1"] == (1.0, 10) and pres["2"] == (0.8, 10)
    text = write_report(spec, tmp_path, tmp_path / "report").read_text()
    assert "| 80 % | **NO** |" in text and "**Classes lost** (raw predictions): nnUNetTrainerX at labeled 2" in text
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["class_presence"]["ok"] is False


# ---------------------------------------------------------------------------------------------- spec


def test_spec_control_default_old_files_and_no_control():
    spec = BenchmarkSpec(dataset="1", configuration="2d", plans="p", trainers=("nnUNetTrainerCPCL",),
                         amounts=("2",), seeds=(0,), test_images=".", test_labels=".", epochs=1,
                         iterations_per_epoch=1)
    assert spec.all_trainers == (PLAIN, CONTROL, "nnUNetTrainerCPCL")
    assert BenchmarkSpec.from_json(spec.to_json()) == spec
    old = json.loads(spec.to_json())
    del old["control"]  # a spec file written before the control existed keeps its trainers on resume
    loaded = BenchmarkSpec.from_json(json.dumps(old))
    assert loaded.control is None and loaded.all_trainers == (PLAIN, "nnUNetTrainerCPCL")
    assert loaded.budget_key() == spec.budget_key()  # resuming it with the new defaults is allowed
    # the control named as a trainer too is run once
    both = BenchmarkSpec(**{**json.loads(spec.to_json()), "trainers": (CONTROL,), "amounts": ("2",),
                            "seeds": (0,)})
    assert both.all_trainers == (PLAIN, CONTROL)


def test_postprocess_without_validation_predictions_says_so(tmp_path):
    from nnunet_proto.benchmark.run_one import postprocess

    spec = BenchmarkSpec(dataset="1", configuration="2d", plans="p", trainers=(), amounts=("2",), seeds=(0,),
                         test_images=".", test_labels=".", epochs=1, iterations_per_epoch=1, run_validation=False)
    run = tmp_path / "run"
    status = postprocess(spec, tmp_path / "fold_5" / "validation", tmp_path, tmp_path / "pred",
                         run / "test_predictions_postprocessed", run / "metrics_postprocessed.json")
    assert status["available"] is False and "--no-validation" in status["reason"]
    assert not (tmp_path / "run" / "metrics_postprocessed.json").exists()


def test_plots_one_amount_same_x_points_for_few_cases_one_y_scale(tmp_path, monkeypatch):
    """Issue: with one labeled amount the trainers were drawn at different x; few cases were drawn as boxes."""
    import matplotlib

    matplotlib.use("agg")
    from matplotlib.axes import Axes

    calls = {"errorbar_x": [], "boxplot": 0}
    real_errorbar, real_boxplot = Axes.errorbar, Axes.boxplot

    def errorbar(self, x, *a, **k):
        if self.get_xlabel() == "" and k.get("label") in ("plain", "ZeroSSL", "X"):  # dice_vs_labeled only
            calls["errorbar_x"].append(list(x))
        return real_errorbar(self, x, *a, **k)

    def boxplot(self, *a, **k):
        calls["boxplot"] += 1
        return real_boxplot(self, *a, **k)

    monkeypatch.setattr(Axes, "errorbar", errorbar)
    monkeypatch.setattr(Axes, "boxplot", boxplot)
    spec = _bench(tmp_path, ["nnUNetTrainerX"], {"nnUNetTrainerX": 0.05}, seeds=(0,), n=6)
    write_report(spec, tmp_path, tmp_path / "report")
    assert calls["errorbar_x"] == [[2.0], [2.0], [2.0]]  # plain, control and X at the amount itself
    assert calls["boxplot"] == 0  # 6 cases: points, not boxes
    assert "**Few pairs (6):**" in (tmp_path / "report" / "README.md").read_text()
    for png in ("dice_vs_labeled.png", "per_case_dice_boxplot.png", "paired_difference.png"):
        assert (tmp_path / "report" / png).stat().st_size > 1000
    assert not (tmp_path / "report" / "validation_dice_vs_compute.png").exists()  # no equal-compute row


def test_validation_ranking_orders_trainers_by_validation_dice_not_test(tmp_path):
    # Y is better on the test cases, X on the validation cases: the ranking follows validation only
    spec = _bench(tmp_path, ["nnUNetTrainerX", "nnUNetTrainerY"], {"nnUNetTrainerX": 0.0, "nnUNetTrainerY": 0.1},
                  control=None, pp=False)
    write_report(spec, tmp_path, tmp_path / "report")
    ranking = json.loads((tmp_path / "report" / "summary.json").read_text())["validation_ranking"]["2"]
    assert [r["trainer"] for r in ranking] == ["nnUNetTrainerX", "nnUNetTrainerY"]
    assert ranking[0]["validation_dice"] == pytest.approx(0.61) and ranking[1]["validation_dice"] == pytest.approx(0.51)


def test_report_shows_stray_islands_of_the_raw_test_predictions(tmp_path):
    import SimpleITK as sitk

    spec = _bench(tmp_path, ["nnUNetTrainerX"], {}, seeds=(0,), control=None, pp=False)
    for trainer, islands in ((PLAIN, 0), ("nnUNetTrainerX", 2)):
        pred = tmp_path / "runs" / Run(trainer, "2", 0, 0).tag / "test_predictions"
        pred.mkdir()
        seg = np.zeros((3, 16, 16), dtype=np.uint8)
        seg[1, 2:6, 2:6] = 1  # 16 voxels of RV
        seg[1, 10:12, 10:12] = 2  # MYO
        for i in range(islands):  # isolated single voxels of RV far from it
            seg[2, 14, 4 + 4 * i] = 1
        sitk.WriteImage(sitk.GetImageFromArray(seg), str(pred / "c0.nii.gz"))
    text = write_report(spec, tmp_path, tmp_path / "report").read_text()
    assert "## Stray islands" in text
    assert "| nnUNetTrainer | 2 | 1.0 / 0.0 % | 1.0 / 0.0 % |" in text
    assert "| nnUNetTrainerX | 2 | 3.0 / 11.1 % | 1.0 / 0.0 % |" in text  # 2 of 18 RV voxels are islands
    islands = json.loads((tmp_path / "report" / "summary.json").read_text())["islands"]
    assert islands["nnUNetTrainerX|2"]["RV"] == {"components": 3.0, "outside_largest": pytest.approx(2 / 18)}
    assert "final validation predictions" not in text  # no run has its nnU-Net validation folder here


def test_report_shows_stray_islands_of_the_validation_predictions(tmp_path):
    """The screening reads validation, so the islands of each run's final validation predictions (nnU-Net's
    fold_X/validation, named by run_info's output_folder) get their own table, cached in the run folder."""
    import SimpleITK as sitk

    spec = _bench(tmp_path, ["nnUNetTrainerX"], {}, seeds=(0,), control=None, pp=False)
    run_dir = tmp_path / "runs" / Run("nnUNetTrainerX", "2", 0, 0).tag
    fold = tmp_path / "results" / "nnUNetTrainerX__P__2d" / "fold_0"
    (fold / "validation").mkdir(parents=True)
    (fold.parent / "dataset.json").write_text(json.dumps({"file_ending": ".nrrd"}))
    seg = np.zeros((3, 16, 16), dtype=np.uint8)
    seg[1, 2:6, 2:6] = 1
    seg[2, 14, 4] = seg[2, 14, 8] = seg[2, 14, 12] = 1  # 3 single-voxel RV islands
    sitk.WriteImage(sitk.GetImageFromArray(seg), str(fold / "validation" / "c0.nrrd"))
    (fold / "validation" / "summary.json").write_text("{}")  # nnU-Net's own files there are not segmentations
    info = json.loads((run_dir / "run_info.json").read_text())
    (run_dir / "run_info.json").write_text(json.dumps({**info, "output_folder": str(fold)}))
    text = write_report(spec, tmp_path, tmp_path / "report").read_text()
    assert "final validation predictions" in text and "| nnUNetTrainerX | 2 | 4.0 / 15.8 % | 0.0 / – |" in text
    table = text.split("final validation predictions")[1].split("\n\n")[1]
    assert "nnUNetTrainerX" in table and "| nnUNetTrainer | 2 |" not in table  # plain has no folder here
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["validation_islands"]["nnUNetTrainerX|2"]["RV"]["components"] == 4.0
    shutil.rmtree(fold)  # the cache in the run folder stands in for nnU-Net's folder (it travels with the records)
    again = write_report(spec, tmp_path, tmp_path / "r2").read_text()
    assert "| nnUNetTrainerX | 2 | 4.0 / 15.8 % | 0.0 / – |" in again


def test_report_of_an_unfinished_benchmark_counts_planned_runs_and_keeps_the_plot_legend(tmp_path, monkeypatch):
    """Labeled 4 registered but not finished: the header counts every planned run, its empty panels say so, and the
    seed legend (taken from the last panel before) is still drawn."""
    import dataclasses

    import matplotlib

    matplotlib.use("agg")
    from matplotlib.axes import Axes

    legends, texts = [], []
    real_legend, real_text = Axes.legend, Axes.text
    monkeypatch.setattr(Axes, "legend", lambda self, *a, **k: (legends.append(a), real_legend(self, *a, **k))[1])
    monkeypatch.setattr(Axes, "text", lambda self, x, y, s, *a, **k: (texts.append(s), real_text(self, x, y, s, *a,
                                                                                                     **k))[1])
    spec = _bench(tmp_path, ["nnUNetTrainerX"], {"nnUNetTrainerX": 0.05})
    spec = dataclasses.replace(spec, amounts=("2", "4"))
    runs = json.loads((tmp_path / "runs.json").read_text()) + [{"trainer": PLAIN, "amount": "4", "seed": 0, "fold": 8}]
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    text = write_report(spec, tmp_path, tmp_path / "report").read_text()
    assert "Runs finished: 9/18." in text  # 3 trainers x 2 amounts x 3 seeds planned, 10 registered, 9 finished
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["runs"]["planned"] == 18
    assert texts.count("no finished pairs yet") == 2  # labeled 4, raw and post-processed
    seed_legend = [a for a in legends if a and any("seed 0" in str(lbl) for lbl in a[1])]
    assert seed_legend, legends


def test_report_paths_are_portable(monkeypatch):
    """Reports are committed and read elsewhere: no folder of the machine that ran the benchmark."""
    monkeypatch.setenv("nnUNet_raw", "/scratch/me/raw/")
    monkeypatch.setenv("nnUNet_results", "/scratch/me/results")
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    assert portable("/scratch/me/raw/Dataset027_ACDC/labelsTs") == "$nnUNet_raw/Dataset027_ACDC/labelsTs"
    assert portable("/scratch/me/raw2/x") == "/scratch/me/raw2/x"  # a sibling folder is not the root
    cmd = ("nnunet_proto benchmark -d 27 --name a -o /scratch/me/reports/a --results-dir /scratch/me/results/b "
           "-tr X")
    assert portable(cmd) == ("nnunet_proto benchmark -d 27 --name a -o <report folder> --results-dir "
                             "$nnUNet_results/b -tr X")
    assert portable("nnunet_proto benchmark --output='/a b/c' -tr X") == \
        "nnunet_proto benchmark --output=<report folder> -tr X"
    # nested roots (the longest wins), a root only where a path starts, "-o" inside a quoted note left alone
    monkeypatch.setenv("nnUNet_results", "/scratch/me/raw/results")
    assert portable("/scratch/me/raw/results/x") == "$nnUNet_results/x"
    assert portable("/work/scratch/me/raw/x") == "/work/scratch/me/raw/x"
    cmd = "nnunet_proto benchmark --notes 'split -o by hand' --group-regex '(patient\\d+)' -o /r -tr X"
    assert portable(cmd) == ("nnunet_proto benchmark --notes 'split -o by hand' --group-regex '(patient\\d+)' "
                             "-o <report folder> -tr X")


def test_warm_started_row_counts_the_plain_run_it_starts_from(tmp_path):
    """Cost of a warm-started run (run_info warm_start_from): plain's steps and training time are part of it."""
    spec = _bench(tmp_path, ["nnUNetTrainerW_warm"], {}, control=None)
    for trainer in (PLAIN, "nnUNetTrainerW_warm"):
        for seed in spec.seeds:
            f = tmp_path / "runs" / Run(trainer, "2", seed, 0).tag / "run_info.json"
            info = {**json.loads(f.read_text()), "epochs": 2}
            if trainer != PLAIN:
                info["warm_start_from"] = {"file": "plain/checkpoint_final.pth", "sha256": "0" * 64}
            f.write_text(json.dumps(info))
    cost = Results(spec, tmp_path).total_cost("nnUNetTrainerW_warm", "2")
    # steps 10 + plain's 10; seconds: (2.5 s x 2 epochs + plain's 1 s x 2) over plain's 2
    assert cost["steps_vs_plain"] == 2.0 and cost["seconds_vs_plain"] == pytest.approx(3.5)
    text = write_report(spec, tmp_path, tmp_path / "report").read_text()
    assert "| 10 + 10 (warm start) | 3.50x |" in text


def _with_equal_compute_row(tmp_path, spec, factor, sec, shift=0.0):
    """Add plain at ``factor`` x the steps to a ``_bench`` benchmark, at ``sec`` s/iteration, its Dice plain's
    + ``shift``."""
    runs = json.loads((tmp_path / "runs.json").read_text())
    for seed in spec.seeds:
        runs.append({"trainer": PLAIN, "amount": "2", "seed": seed, "fold": 5 + seed, "steps_factor": factor})
        plain = json.loads((tmp_path / "runs" / Run(PLAIN, "2", seed, 0).tag / "metrics.json").read_text())
        for case in plain["metric_per_case"]:
            for m in case["metrics"].values():
                m["Dice"] += shift
        d = tmp_path / "runs" / Run(PLAIN, "2", seed, 0, steps_factor=factor).tag
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps(plain))
        (d / "run_info.json").write_text(json.dumps({"seconds_per_iteration_median": sec,
                                                     "seconds_per_epoch_median": sec * 10, "steps_factor": factor}))
    (tmp_path / "runs.json").write_text(json.dumps(runs))


@pytest.mark.parametrize("factor,covered", [(2.0, False), (3.0, True)])
def test_equal_compute_row_is_checked_against_the_most_expensive_row(tmp_path, factor, covered):
    """The report says whether the equal-compute factor covers the most expensive row's measured cost."""
    spec = _bench(tmp_path, ["nnUNetTrainerX"], {"nnUNetTrainerX": 0.05}, control=None, equal_compute=factor,
                  equal_compute_source="test")
    _with_equal_compute_row(tmp_path, spec, factor, sec=0.1, shift=0.02)
    # X: 0.25 s/iteration against plain's 0.1, the same steps: 2.5x plain's time
    write_report(spec, tmp_path, tmp_path / "report")
    measured = json.loads((tmp_path / "report" / "summary.json").read_text())["equal_compute"]["measured"]
    assert measured["most_expensive"]["trainer"] == "nnUNetTrainerX"
    assert measured["most_expensive"]["seconds_vs_plain"] == pytest.approx(2.5)
    assert measured["equal_compute_seconds_vs_plain"] == pytest.approx(factor)
    assert measured["covered"] is covered
    text = (tmp_path / "report" / "README.md").read_text()
    assert ("covers every row" in text) is covered and ("does not cover it" in text) is not covered
    # head to head: X is +5 points over plain, plain at equal compute +2, so X is +3 over it, at every seed
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    head = {r["kind"]: r for r in summary["against_equal_compute"] if r["trainer"] == "nnUNetTrainerX"}
    assert head["raw"]["dice_delta"] == pytest.approx(0.03) and head["raw"]["wins"] == 36
    assert head["raw"]["seed_spread"]["seed_deltas"] == {str(s): pytest.approx(0.03) for s in spec.seeds}
    # the same fields as the comparisons against plain, per class included
    assert set(head["raw"]) - {"trainer", "labeled_amount", "kind"} == set(
        next(r for r in summary["comparisons"] if r["trainer"] == "nnUNetTrainerX")["raw"])
    assert all(v["delta"] == pytest.approx(0.03) for v in head["raw"]["per_class_dice"].values())
    assert "## Against plain nnU-Net at equal compute" in text and "| 2 | nnUNetTrainerX | raw | 36 | +3.0" in text


def _set_info(tmp_path, spec, trainer, **fields):
    for seed in spec.seeds:
        f = tmp_path / "runs" / Run(trainer, "2", seed, 0).tag / "run_info.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), "epochs": 2, **fields}))


def test_equal_compute_factor_comes_from_the_screening_on_one_machine(tmp_path):
    """A confirmation's plain at equal compute: the largest total time vs plain of its picks in the screening,
    rounded up, the machine named; refused when a pick and plain trained on different machines or a pick has no
    cost. The cost table names each row's machines and warns when rows differ."""
    from nnunet_proto.benchmark.ablation import equal_compute_factor

    warm, x = "nnUNetTrainerW_warm", "nnUNetTrainerX"
    spec = _bench(tmp_path, [warm, x], {}, control=None)
    _set_info(tmp_path, spec, PLAIN)
    _set_info(tmp_path, spec, x)
    _set_info(tmp_path, spec, warm, warm_start_from={"file": "plain/checkpoint_final.pth", "sha256": "0" * 64})

    def summary():
        write_report(spec, tmp_path, tmp_path / "report")
        return json.loads((tmp_path / "report" / "summary.json").read_text())

    # W_warm: 2.5 s/epoch x 2 + plain's 1 x 2 over plain's 2 = 3.5x; X: 2.5x; runs of older versions: no machine
    factor, source = equal_compute_factor(summary(), [x, warm], amount="2")
    assert factor == pytest.approx(3.5) and source.startswith(f"{warm}, 3.50x") and "machine not recorded" in source
    assert equal_compute_factor(summary(), [x], amount="2")[0] == pytest.approx(2.5)
    assert "| not recorded |" in (tmp_path / "report" / "README.md").read_text()
    for row in (PLAIN, x, warm):
        _set_info(tmp_path, spec, row, training_machines=["CPU A (2 logical CPUs)"])
    factor, source = equal_compute_factor(summary(), [x, warm], amount="2")
    assert factor == pytest.approx(3.5) and "on CPU A (2 logical CPUs)" in source
    text = (tmp_path / "report" / "README.md").read_text()
    assert "| CPU A (2 logical CPUs) |" in text and "Rows trained on different machines" not in text
    _set_info(tmp_path, spec, x, training_machines=["CPU A (2 logical CPUs)", "CPU B (16 logical CPUs)"])
    s = summary()
    assert "**Rows trained on different machines** (CPU A (2 logical CPUs); CPU B (16 logical CPUs))" in (
        tmp_path / "report" / "README.md").read_text()
    with pytest.raises(ValueError, match="different machines"):
        equal_compute_factor(s, [x, warm], amount="2")
    assert equal_compute_factor(s, [warm], amount="2")[0] == pytest.approx(3.5)  # W and plain: one machine
    with pytest.raises(ValueError, match="no measured cost"):
        equal_compute_factor(s, ["nnUNetTrainerNotRun"], amount="2")
    # the note names exactly the rows without a record: W (an older version), not plain or X
    _set_info(tmp_path, spec, x, training_machines=["CPU A (2 logical CPUs)"])
    _set_info(tmp_path, spec, warm, training_machines=None)
    factor, source = equal_compute_factor(summary(), [x, warm], amount="2")
    assert source.endswith(f"on CPU A (2 logical CPUs); machine not recorded for {warm}), rounded up to 3.5")
    # plain's pace takes its equal-compute row's runs too, so their machine joins the check
    spec = dataclasses.replace(spec, equal_compute=2.0, equal_compute_source="test")
    _with_equal_compute_row(tmp_path, spec, 2.0, sec=0.1, shift=0.0)
    for seed in spec.seeds:
        f = tmp_path / "runs" / Run(PLAIN, "2", seed, 0, steps_factor=2.0).tag / "run_info.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), "training_machines": ["CPU B (16 logical CPUs)"]}))
    with pytest.raises(ValueError, match="different machines"):
        equal_compute_factor(summary(), [x], amount="2")


def test_a_warm_start_trainer_counts_plain_even_without_its_record(tmp_path):
    """A _warm trainer always starts from the plain run, so its cost counts plain's training even when its run
    lost the warm_start_from record (resumed before run_one kept it); a trainer that does not warm-start, its
    EMA teacher and plain at equal compute do not count it."""
    warm, cold = "nnUNetTrainerBCP_warm", "nnUNetTrainerBCP"
    spec = _bench(tmp_path, [warm, cold], {}, seeds=(0,), control=None)
    res = Results(spec, tmp_path)
    assert res.warm_started(warm) and not res.warm_started(cold) and not res.warm_started(PLAIN)
    # 2.5 s/epoch x 2 epochs, plus plain's 1 x 2, over plain's 2
    assert res.total_cost(warm, "2")["seconds_vs_plain"] == pytest.approx(3.5)
    assert res.total_cost(warm, "2")["steps"] == 20
    assert res.total_cost(cold, "2")["seconds_vs_plain"] == pytest.approx(2.5)
    assert not res.warm_started("nnUNetTrainerNotATrainer")  # no run, no lookup


@pytest.mark.parametrize("ratio,factor", [(3.4, 3.4), (3.41, 3.5), (2.32, 2.4), (1.0, 1.0)])
def test_equal_compute_factor_rounds_up(ratio, factor):
    from nnunet_proto.benchmark.ablation import equal_compute_factor

    summary = {"benchmark": "b", "comparisons": [{"trainer": "T", "labeled_amount": "4",
                                                  "cost_vs_plain": {"seconds": ratio}}]}
    assert equal_compute_factor(summary, ["T"]) == (pytest.approx(factor), f"T, {ratio:.2f}x plain's total "
                                                    f"training time in the screening (b, 4 labeled, machine not "
                                                    f"recorded), rounded up to {factor:.1f}")


def test_cost_uses_each_rows_fastest_pace_and_the_pseudo_labeling_that_was_done(tmp_path):
    """Runs slowed by other work do not set a row's cost (its fastest run does), and a self-training run that
    reused labels an earlier run had made does not count their cost as ~0 s; an interrupted labeling is scaled to
    the whole pool."""
    st = "nnUNetTrainerSelfTraining"
    spec = _bench(tmp_path, [st], {}, control=None)
    labeling = {0: (100.0, 10, 10), 1: (1.0, 0, 10), 2: (60.0, 5, 10)}  # wall s, predicted, pool
    for seed in spec.seeds:
        for row in (PLAIN, st):
            f = tmp_path / "runs" / Run(row, "2", seed, 0).tag / "run_info.json"
            info = {**json.loads(f.read_text()), "epochs": 2}
            if row == PLAIN and seed < 2:
                info["seconds_per_epoch_median"] = 50.0  # two contended runs: 50x the third's pace
            if row == st:
                wall, done, pool = labeling[seed]
                info.update(pseudo_label_wall_s=wall, pseudo_labels_predicted=done, pseudo_labels=pool)
            f.write_text(json.dumps(info))
    res = Results(spec, tmp_path)
    assert math.isnan(res.pseudo_label_seconds((st, "2", 1)))
    assert res.pseudo_label_seconds((st, "2", 2)) == pytest.approx(120.0)
    cost = res.total_cost(st, "2")
    # plain 1 s/epoch (the fastest of 50, 50, 1) x 2 epochs = 2 s; student 2.5 x 2 = 5 s + teacher 2 s + the
    # fastest labeling of 100 and 120 s
    assert cost["pseudo_label_seconds"] == pytest.approx(100.0)
    assert cost["seconds_vs_plain"] == pytest.approx((5 + 2 + 100) / 2)
    text = write_report(spec, tmp_path, tmp_path / "report").read_text()
    assert "– (labels of an earlier run)" in text


def _curves(run_dir, seconds):
    """Training curves with these epoch times (nnU-Net's epoch timestamps, as run_one saves them)."""
    start = np.cumsum([0.0] + list(seconds[:-1])) + 1000.0
    (run_dir / "curves.json").write_text(json.dumps({"epoch_start_timestamps": list(start),
                                                     "epoch_end_timestamps": list(start + np.asarray(seconds))}))


def test_a_run_shared_with_other_work_has_its_pace_from_its_fast_epochs(tmp_path, monkeypatch):
    """A run's pace is the 10th percentile of its epoch times, so epochs slowed by other work, the first epoch's
    start-up and an epoch spanning a pause do not count; plain's pace is the fastest of plain and its equal-compute
    row (the same work per epoch), so a plain run slowed throughout does not inflate every ratio; the cost table
    and the total time use it, and runs without curves keep their recorded median."""
    spec = _bench(tmp_path, ["nnUNetTrainerX"], {}, seeds=(0,), control=None, equal_compute=2.0,
                  equal_compute_source="test")
    _with_equal_compute_row(tmp_path, spec, 2.0, sec=0.1, shift=0.0)
    runs = tmp_path / "runs"
    # plain slowed by half throughout (median 1.5 s); its equal-compute row ran alone for its last 4 of 20 epochs
    _curves(runs / Run(PLAIN, "2", 0, 0).tag, [1.5] * 10)
    _curves(runs / Run(PLAIN, "2", 0, 0, steps_factor=2.0).tag, [30.0] + [1.5] * 15 + [1.0] * 4)
    info = runs / Run(PLAIN, "2", 0, 0, steps_factor=2.0).tag / "run_info.json"
    info.write_text(json.dumps({**json.loads(info.read_text()), "validation_foreground_dice": 0.55}))
    # X: start-up, slowed epochs, one that spans a pause; alone it takes 2.5 s
    _curves(runs / Run("nnUNetTrainerX", "2", 0, 0).tag, [9.0, 2.5, 2.5, 5.0, 2.5, 4.0, 600.0, 2.5, 2.5, 4.0])
    res = Results(spec, tmp_path)
    assert res.run_pace(("nnUNetTrainerX", "2", 0)) == pytest.approx(2.5)
    assert res.run_pace((PLAIN, "2", 0)) == pytest.approx(1.5)
    assert res.epoch_seconds(PLAIN) == pytest.approx(1.0)
    assert res.epoch_seconds("nnUNetTrainerX") == pytest.approx(2.5)
    assert res.total_cost("nnUNetTrainerX", "2")["seconds_vs_plain"] == pytest.approx(2.5)
    # the comparison tables' s/step too (5 iterations per epoch; the recorded medians said 0.1 for plain)
    assert res.seconds_per_step(PLAIN, "2") == pytest.approx(0.2)
    assert res.seconds_per_step("nnUNetTrainerX", "2") == pytest.approx(0.5)
    from matplotlib.axes import Axes

    drawn = {"scatter": [], "plot": []}
    real_scatter, real_plot = Axes.scatter, Axes.plot
    monkeypatch.setattr(Axes, "scatter", lambda self, x, y, *a, **k: (drawn["scatter"].append((list(x), list(y))),
                                                                       real_scatter(self, x, y, *a, **k))[1])
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **k: (drawn["plot"].append(a[:2]), real_plot(self, *a, **k))[1])
    text = write_report(spec, tmp_path, tmp_path / "report").read_text()
    # X at 2.5x plain's time and its validation Dice (0.6: _bench gives X-named trainers +0.1); plain's line
    # from (1, 50) to (2, 55)
    assert ([2.5], [pytest.approx(60.0)]) in drawn["scatter"]
    assert ((1.0, 2.0), (pytest.approx(50.0), pytest.approx(55.0))) in drawn["plot"]
    assert "| nnUNetTrainerX | 2.5 | 2.5 | 0.500 | 2.50x | 10 | 2.50x |" in text  # pace, median, s/iteration, ...
    assert "| nnUNetTrainer | 1.0 |" in text  # plain at the pace of its equal-compute row
    # validation Dice against compute: drawn with an equal-compute row, and the report says how to read it
    assert (tmp_path / "report" / "validation_dice_vs_compute.png").is_file()
    assert "![validation_dice_vs_compute.png](validation_dice_vs_compute.png)" in text
    assert "a row under the line is behind plain trained as long" in text
    measured = json.loads((tmp_path / "report" / "summary.json").read_text())["equal_compute"]["measured"]
    assert measured["covered"] is False and measured["most_expensive"]["seconds_vs_plain"] == pytest.approx(2.5)
    # without curves: the recorded median (0.25 s/iteration x 10)
    (runs / Run("nnUNetTrainerX", "2", 0, 0).tag / "curves.json").unlink()
    assert Results(spec, tmp_path).epoch_seconds("nnUNetTrainerX") == pytest.approx(2.5)


def test_validation_ablations_compare_each_variant_with_its_base(tmp_path):
    """Which change moved what: a variant against its base trainer on validation, per class from nnU-Net's
    validation summary.json, in the report and summary.json; a variant without its base is not listed."""
    spec = _bench(tmp_path, ["nnUNetTrainerX", "nnUNetTrainerX_strong", "nnUNetTrainerY_v2"], {}, seeds=(0,),
                  control=None)
    per_class = {PLAIN: (0.80, 0.60), "nnUNetTrainerX": (0.82, 0.64), "nnUNetTrainerX_strong": (0.85, 0.61),
                 "nnUNetTrainerY_v2": (0.9, 0.9)}
    for trainer, (c1, c2) in per_class.items():
        run_dir = tmp_path / "runs" / Run(trainer, "2", 0, 0).tag
        fold = tmp_path / "results" / trainer / "fold_0"
        (fold / "validation").mkdir(parents=True)
        (fold / "validation" / "summary.json").write_text(json.dumps(
            {"foreground_mean": {"Dice": (c1 + c2) / 2}, "mean": {"1": {"Dice": c1}, "2": {"Dice": c2}}}))
        info = json.loads((run_dir / "run_info.json").read_text())
        (run_dir / "run_info.json").write_text(json.dumps({**info, "output_folder": str(fold)}))
    write_report(spec, tmp_path, tmp_path / "report")
    (row,) = json.loads((tmp_path / "report" / "summary.json").read_text())["validation_ablations"]
    a, b = CLASSES["1"], CLASSES["2"]
    assert row["trainer"] == "nnUNetTrainerX_strong" and row["base"] == "nnUNetTrainerX" and row["seeds"] == [0]
    assert row["delta_vs_base"] == {"mean": pytest.approx(0.0), a: pytest.approx(0.03), b: pytest.approx(-0.03)}
    assert row["delta_vs_plain"]["mean"] == pytest.approx(0.03) and row["base_delta_vs_plain"][a] == \
        pytest.approx(0.02)
    text = (tmp_path / "report" / "README.md").read_text()
    assert "## Validation ablations" in text
    assert row["reading"] == "not resolved (under 3)"
    assert ("| 2 | nnUNetTrainerX_strong | nnUNetTrainerX | 1 | 73.0 (85.0 / 61.0) | +0.0 (+3.0 / -3.0) | +3.0; "
            "+3.0 | not resolved (under 3) |") in text


@pytest.mark.parametrize("trainer,delta,reading", [
    ("nnUNetTrainerCPCL_strong", 0.031, "candidate default"), ("nnUNetTrainerCPCL_strong", 0.029, "not resolved"),
    ("nnUNetTrainerCPCL_strong", -0.029, "not resolved"), ("nnUNetTrainerCPCL_strong", -0.03, "behind by ≥ 3"),
    ("nnUNetTrainerCPCL_labeledcontrol", -0.02, "cannot tell"),
    ("nnUNetTrainerCPCL_labeledcontrol", -0.04, "its gain uses the unlabeled images"),
    ("nnUNetTrainerCPCL_labeledcontrol", 0.04, "the unlabeled patches cost the base"),
    ("nnUNetTrainerCPCL_strong", float("nan"), "no validation Dice")])
def test_screening_reading_applies_the_pre_registered_three_point_rule(trainer, delta, reading):
    from nnunet_proto.benchmark.ablation import screening_reading

    assert reading in screening_reading(trainer, delta)


def test_a_variant_is_read_against_its_nearest_ancestor_that_ran():
    """BCP_warm_lcc is one switch on BCP_warm, so it is read against BCP_warm where that ran, else against BCP's
    default; a default or a variant without any ancestor in the screening has no ablation row."""
    from nnunet_proto.benchmark.ablation import ablation_base

    ran = ["nnUNetTrainer", "nnUNetTrainerBCP_warm", "nnUNetTrainerBCP_warm_lcc", "nnUNetTrainerCPCL",
           "nnUNetTrainerCPCL_strong", "nnUNetTrainerPCCS_v2"]
    assert ablation_base("nnUNetTrainerBCP_warm_lcc", ran) == "nnUNetTrainerBCP_warm"
    assert ablation_base("nnUNetTrainerBCP_warm_lcc", ["nnUNetTrainerBCP"]) == "nnUNetTrainerBCP"
    assert ablation_base("nnUNetTrainerCPCL_strong", ran) == "nnUNetTrainerCPCL"
    assert ablation_base("nnUNetTrainerBCP_warm", ran) is None  # BCP's default did not run
    assert ablation_base("nnUNetTrainerPCCS_v2", ran) is None and ablation_base("nnUNetTrainerCPCL", ran) is None


def test_confirmation_picks_the_best_row_of_each_method_and_never_a_control():
    """The screening's pre-registered rule, step 1: the k best by validation Dice, one per method (a variant beats
    its own default only if it validates better), CPCL's labeled-patch control never picked, NaN rows skipped."""
    from nnunet_proto.benchmark.ablation import confirmation_picks

    ranking = [{"trainer": "nnUNetTrainerCPCL_ema99@teacher", "validation_dice": 0.95},
               {"trainer": "nnUNetTrainer@x2.3", "validation_dice": 0.94},
               {"trainer": "nnUNetTrainerCPCL_labeledcontrol", "validation_dice": 0.91},
               {"trainer": "nnUNetTrainerCPCL_strong", "validation_dice": 0.90},
               {"trainer": "nnUNetTrainerCPCL", "validation_dice": 0.89},
               {"trainer": "nnUNetTrainerBCP_warm", "validation_dice": 0.85},
               {"trainer": "nnUNetTrainerPCCS_v2", "validation_dice": float("nan")},
               {"trainer": "nnUNetTrainerMeanTeacher_v2", "validation_dice": 0.80},
               {"trainer": "nnUNetTrainerUniMatch", "validation_dice": 0.88}]
    assert confirmation_picks(ranking) == ["nnUNetTrainerCPCL_strong", "nnUNetTrainerUniMatch",
                                           "nnUNetTrainerBCP_warm"]
    assert confirmation_picks(ranking, 5)[-1] == "nnUNetTrainerMeanTeacher_v2"
    assert confirmation_picks(list(reversed(ranking)), 1) == ["nnUNetTrainerCPCL_strong"]  # order of the input
    with pytest.raises(ValueError, match="at least one"):
        confirmation_picks(ranking, 0)


def test_semi_supervised_signal_from_training_logs(tmp_path):
    """The report's signal table: gradient ratio (median of the last epochs), pseudo/labeled share, kept (all and
    per class), confidence, teacher-student disagreement."""
    spec = _bench(tmp_path, ["nnUNetTrainerX"], {"nnUNetTrainerX": 0.0}, seeds=(0, 1))
    epochs = 8
    for seed in (0, 1):
        log = {"train_losses": [0.0] * epochs, "ema_fg_dice": [0.5] * epochs,
               "ssl_gradnorm_sup": [1.0] * epochs, "ssl_gradnorm_total": [1.0] * epochs,
               # the last 5 epochs: 0.02 x 3 and 0.5, 0.5 -> median 0.02; the early 9.0 is outside the window
               "ssl_gradnorm_cons": [9.0, 9.0, 9.0, 0.02, 0.5, 0.02, 0.5, 0.02],
               "ssl_pl_share_c0": [0.9] * epochs, "ssl_labeled_share_c0": [0.9] * epochs,
               "ssl_pl_share_c1": [0.01 * (1 + seed)] * epochs, "ssl_labeled_share_c1": [0.04] * epochs,
               "ssl_pl_share_c2": [0.05] * epochs, "ssl_labeled_share_c2": [0.05] * (epochs - 1) + [float("nan")],
               "ssl_pl_kept": [0.8] * epochs, "ssl_pl_confidence": [0.95] * epochs,
               # per-class kept share: NaN epochs (no voxel of the class) are left out; disagreement per epoch
               "ssl_pl_kept_c1": [0.5] * (epochs - 1) + [float("nan")], "ssl_pl_kept_c2": [0.2 + 0.2 * seed] * epochs,
               "ssl_teacher_disagreement": [0.5] * 3 + [0.01 * (1 + seed)] * (epochs - 3)}
        d = tmp_path / "runs" / Run("nnUNetTrainerX", "2", seed, 0).tag
        (d / "curves.json").write_text(json.dumps(log))
    write_report(spec, tmp_path, tmp_path / "report")
    text = (tmp_path / "report" / "README.md").read_text()
    assert "## Semi-supervised signal" in text and "pseudo_labels_labeled2.png" in text
    assert (tmp_path / "report" / "pseudo_labels_labeled2.png").is_file()
    rows = json.loads((tmp_path / "report" / "summary.json").read_text())["semi_supervised_signal"]["rows"]
    (row,) = [r for r in rows if r["trainer"] == "nnUNetTrainerX"]
    assert row["seeds"] == 2 and row["gradient_vs_supervised"] == {"cons": pytest.approx(0.02)}
    names = list(CLASSES.values())
    # class 1: 0.25 (seed 0) and 0.5 (seed 1) of its labeled share; class 2: NaN epoch dropped, then 1.0
    assert row["pseudo_label_share_vs_labeled"][names[0]] == pytest.approx(0.375)
    assert row["pseudo_label_share_vs_labeled"][names[1]] == pytest.approx(1.0)
    assert row["kept_by_gate"] == pytest.approx(0.8) and row["teacher_confidence"] == pytest.approx(0.95)
    assert row["kept_by_gate_per_class"] == {names[0]: pytest.approx(0.5), names[1]: pytest.approx(0.3)}
    assert row["teacher_disagreement"] == pytest.approx(0.015)  # last 5 epochs, mean over seeds
    assert "| nnUNetTrainerX | 2 | cons 0.020 | 0.38 / 1.00 | 0.80 | 0.50 / 0.30 | 0.950 | 0.0150 |" in text


def test_validation_agreement_pairs_validation_and_test_deltas(tmp_path):
    """Δ validation vs Δ test per (trainer, seed): r and sign agreement, in the report and summary.json."""
    spec = _bench(tmp_path, ["nnUNetTrainerX"], {"nnUNetTrainerX": lambda s: [-0.02, 0.01, 0.05][s]})
    for seed, val in enumerate([0.48, 0.53, 0.60]):  # plain's validation is 0.5 + 0.01 s: Δ -0.02, +0.02, +0.08
        f = tmp_path / "runs" / Run("nnUNetTrainerX", "2", seed, 0).tag / "run_info.json"
        info = json.loads(f.read_text())
        f.write_text(json.dumps({**info, "validation_foreground_dice": val}))
    res = Results(spec, tmp_path)
    rows = {(r["labeled_amount"], r["kind"]): r for r in validation_agreement(res)}
    raw = rows[("2", "raw")]
    x = [p for p in raw["pairs"] if p["trainer"] == "nnUNetTrainerX"]
    assert [p["validation_delta"] for p in x] == pytest.approx([-0.02, 0.02, 0.08])
    assert [p["test_delta"] for p in x] == pytest.approx([-0.02, 0.01, 0.05], abs=0.011)  # clipping at 0/1 aside
    assert raw["n_pairs"] == 6 and 0 <= raw["same_sign"] <= 1 and -1 <= raw["pearson_r"] <= 1
    write_report(spec, tmp_path, tmp_path / "report")
    text = (tmp_path / "report" / "README.md").read_text()
    assert "## Validation as a guide" in text and "X s0 -2.0 →" in text
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert {r["kind"] for r in summary["validation_agreement"]} == {"raw", "postprocessed"}

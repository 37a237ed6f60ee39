"""Benchmark smoke run on the synthetic dataset: plain nnU-Net + CPCL, one amount, one seed, a few iterations."""
import json
import math

import numpy as np
import pytest
from conftest import DATASET_ID, PLANS, run_cli

from nnunet_proto.benchmark.report import Results, case_table
from nnunet_proto.benchmark.spec import BenchmarkSpec


@pytest.fixture
def benchmark_args(synthetic_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    results = tmp_path / "bench"
    report = tmp_path / "report"
    args = ["benchmark", "-d", str(DATASET_ID), "-c", "2d", "-p", PLANS, "-tr", "nnUNetTrainerCPCL",
            "--labeled", "3", "--seeds", "0", "--epochs", "1", "--iterations", "3", "--val-iterations", "1",
            "--no-validation", "--disable-tta", "--name", "smoke", "--results-dir", str(results), "-o", str(report)]
    return args, results, report


def test_benchmark_runs_reports_and_resumes(benchmark_args, synthetic_dataset):
    args, results, report = benchmark_args
    run_cli(*args)
    text = (report / "README.md").read_text()
    for name in ("nnUNetTrainer", "nnUNetTrainerCPCL"):
        assert f"| 3 | {name} |" in text
    for section in ("### Dice", "### HD95", "## Paired tests", "## Cost", "Wilcoxon", "without mirroring"):
        assert section in text
    for png in ("dice_vs_labeled.png", "per_case_dice_boxplot.png", "training_curves_labeled3.png"):
        assert (report / png).stat().st_size > 1000
    runs = json.loads((results / "runs.json").read_text())
    assert {r["trainer"] for r in runs} == {"nnUNetTrainer", "nnUNetTrainerCPCL"}
    assert len({r["fold"] for r in runs}) == 1  # both trainers on the same label-scarce fold
    run_dir = results / "runs" / "nnUNetTrainerCPCL" / "labeled3_seed0"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["metric_per_case"]) == 2 and {"Dice", "IoU", "HD95", "ASD"} <= set(metrics["foreground_mean"])
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["checkpoint"] == "final" and info["seconds_per_epoch_median"] > 0
    curves = json.loads((run_dir / "curves.json").read_text())
    assert "ssl_loss_bpc" in curves
    assert "predicting test cases" in (run_dir / "log.txt").read_text()  # progress of the prediction phase
    # the trainer used exactly the fold's unlabeled cases and the manifest's, and says which
    (config_file,) = (results / "nnUNet_results").rglob("nnunet_proto_config.json")
    ids = json.loads(config_file.read_text())["unlabeled"]["case_ids"]
    manifest = json.loads((synthetic_dataset.preprocessed / "nnUNetPlans_2d_unlabeled.json").read_text())
    fold = json.loads((synthetic_dataset.preprocessed / "splits_final.json").read_text())[runs[0]["fold"]]
    assert ids == {"folder": manifest["cases"], "split": sorted(fold["unlabeled"])}
    stamp = (run_dir / "metrics.json").stat().st_mtime

    # a second invocation skips finished runs (nothing retrained, metrics untouched)
    out = run_cli(*args)
    assert (run_dir / "metrics.json").stat().st_mtime == stamp
    log = (run_dir / "log.txt").read_text()
    assert log.count("RUN DONE") == 1
    del out

    # changing the budget of an existing benchmark is refused
    changed = list(args)
    changed[changed.index("--epochs") + 1] = "2"
    from nnunet_proto.cli import main

    assert main(changed) == 2
    # ... and so is switching test-time mirroring back on (the test predictions would differ)
    assert main([a for a in args if a != "--disable-tta"]) == 2


def test_spec_written_before_the_mirroring_option_loads_with_nnunet_default():
    spec = BenchmarkSpec(dataset="1", configuration="2d", plans="p", trainers=(), amounts=("2",), seeds=(0,),
                         test_images=".", test_labels=".", epochs=1, iterations_per_epoch=1)
    old = json.loads(spec.to_json())
    del old["test_time_mirroring"]
    assert BenchmarkSpec.from_json(json.dumps(old)).test_time_mirroring is True


def test_report_statistics_on_hand_made_results(tmp_path):
    spec = BenchmarkSpec(dataset="1", configuration="2d", plans="p", trainers=("nnUNetTrainerX",), amounts=("2",),
                         seeds=(0,), test_images=".", test_labels=".", epochs=1, iterations_per_epoch=1)
    root = tmp_path
    (root / "runs.json").write_text(json.dumps([{"trainer": t, "amount": "2", "seed": 0, "fold": 5}
                                                for t in ("nnUNetTrainer", "nnUNetTrainerX")]))
    plain = [0.5, 0.6, 0.7, 0.4, 0.5]
    better = [p + d for p, d in zip(plain, [0.10, 0.05, 0.12, 0.08, 0.03])]  # distinct differences: exact test
    for trainer, dice in (("nnUNetTrainer", plain), ("nnUNetTrainerX", better)):
        d = root / "runs" / trainer / "labeled2_seed0"
        d.mkdir(parents=True)
        per_case = [{"case": f"c{i}", "metrics": {"1": {"Dice": v, "IoU": v / (2 - v), "HD95": 10 * (1 - v),
                                                        "ASD": 1 - v, "rule": "both_present"}}}
                    for i, v in enumerate(dice)]
        (d / "metrics.json").write_text(json.dumps({"metric_per_case": per_case, "mean": {"1": {"name": "a"}}}))
    res = Results(spec, root)
    mean, sd, n = res.summary("nnUNetTrainerX", "2", "fg", "Dice")
    assert mean == pytest.approx(np.mean(better)) and n == 1 and sd == pytest.approx(np.std(better, ddof=1))
    test = res.paired("nnUNetTrainerX", "2", "Dice")
    assert test["n"] == 5 and test["wins"] == 5 and test["mean_diff"] == pytest.approx(0.076)
    assert test["p"] == pytest.approx(0.0625)  # exact two-sided Wilcoxon p for 5 of 5 positive differences
    hd = res.paired("nnUNetTrainerX", "2", "HD95")
    assert hd["wins"] == 5 and hd["mean_diff"] == pytest.approx(-0.76)  # lower HD95 is better
    undefined = case_table({"metric_per_case": [{"case": "a", "metrics": {"1": {"Dice": None, "IoU": None,
                                                                                "HD95": None, "ASD": None}}}]})
    assert math.isnan(undefined["a"]["fg"]["Dice"])  # JSON null (undefined) stays undefined, never 0

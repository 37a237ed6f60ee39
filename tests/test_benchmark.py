"""Benchmark smoke run on the synthetic dataset: plain nnU-Net, CPCL (and its EMA teacher's row), offline
self-training and plain at equal compute, one amount, one seed, a few iterations.

The A/A control is left out (--no-control) to keep it cheap; its report row is tested on hand-made results in
test_benchmark_stats.py.
"""
import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import DATASET_ID, PLANS, run_cli

from nnunet_proto.benchmark.records import machine_name
from nnunet_proto.benchmark.results import Results, case_table
from nnunet_proto.benchmark.spec import BenchmarkSpec


@pytest.fixture
def benchmark_args(synthetic_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    results = tmp_path / "bench"
    report = tmp_path / "report"
    args = ["benchmark", "-d", str(DATASET_ID), "-c", "2d", "-p", PLANS, "-tr", "nnUNetTrainerCPCL",
            "--labeled", "3", "--seeds", "0", "--epochs", "1", "--iterations", "3", "--val-iterations", "1",
            "--no-control", "--disable-tta", "--name", "smoke", "--results-dir", str(results), "-o", str(report),
            "--self-training", "--equal-compute", "2", "--equal-compute-source", "test: twice plain's steps"]
    return args, results, report


def test_benchmark_runs_reports_and_resumes(benchmark_args, synthetic_dataset):
    args, results, report = benchmark_args
    run_cli(*args)
    text = (report / "README.md").read_text()
    for name in ("nnUNetTrainer", "nnUNetTrainerCPCL"):
        assert f"| 3 | {name} |" in text
    for section in ("### Dice", "### HD95", "## Against plain nnU-Net", "## Cost", "Wilcoxon", "without mirroring",
                    "hierarchical bootstrap", "## Test results after nnU-Net's postprocessing", "## No class lost"):
        assert section in text
    assert "without post-processed numbers" not in text and "nnUNetTrainerZeroSSL" not in text
    for png in ("dice_vs_labeled.png", "per_case_dice_boxplot.png", "training_curves_labeled3.png",
                "paired_difference.png"):
        assert (report / png).stat().st_size > 1000
    runs = json.loads((results / "runs.json").read_text())
    assert {r["trainer"] for r in runs} == {"nnUNetTrainer", "nnUNetTrainerCPCL", "nnUNetTrainerSelfTraining"}
    assert sorted(r.get("steps_factor", 1.0) for r in runs) == [1.0, 1.0, 1.0, 2.0]
    assert len({r["fold"] for r in runs}) == 1  # every row on the same label-scarce fold
    # the new rows: self-training (its teacher is the plain run), plain at equal compute, CPCL's EMA teacher
    for row in ("| 3 | nnUNetTrainerSelfTraining | 0 | 3 + 3 (teacher) |",
                "| 3 | nnUNetTrainer ×2 steps (equal compute) | 0 | 6 |",
                "| 3 | nnUNetTrainerCPCL, EMA teacher | 0 | 3 |"):
        assert row in text, row
    assert "## Offline self-training" in text and "Factor: test: twice plain's steps" in text
    summary = json.loads((report / "summary.json").read_text())
    kinds = {r["trainer"]: r["kind"] for r in summary["comparisons"]}
    assert kinds == {"nnUNetTrainerCPCL": "trainer", "nnUNetTrainerCPCL@teacher": "ema_teacher",
                     "nnUNetTrainerSelfTraining": "self_training", "nnUNetTrainer@x2": "equal_compute"}
    ec = summary["equal_compute"]
    assert (ec["factor"], ec["source"]) == (2.0, "test: twice plain's steps")
    assert ec["measured"]["most_expensive"]["trainer"] in kinds and isinstance(ec["measured"]["covered"], bool)
    assert {(r["trainer"], r["kind"]) for r in summary["against_equal_compute"]} == {
        (t, k) for t in kinds if t != "nnUNetTrainer@x2" for k in ("raw", "postprocessed")}
    assert "## Against plain nnU-Net at equal compute" in text
    st_row = next(r for r in summary["comparisons"] if r["kind"] == "self_training")
    assert st_row["cost_vs_plain"]["steps"] == 2.0 and st_row["cost_vs_plain"]["pseudo_label_seconds"] > 0
    st_dir = results / "runs" / "nnUNetTrainerSelfTraining" / "labeled3_seed0"
    st_info = json.loads((st_dir / "run_info.json").read_text())
    fold = json.loads((synthetic_dataset.preprocessed / "splits_final.json").read_text())[runs[0]["fold"]]
    assert st_info["pseudo_labels"] == len(fold["unlabeled"]) + 3  # the split's unlabeled cases + imagesUnlabeled
    assert "nnUNetTrainer" in st_info["pseudo_label_teacher"]
    (manifest_file,) = (results / "pseudo_labels").rglob("manifest.json")  # the benchmark's own set
    assert not set(json.loads(manifest_file.read_text())["cases"]) & set(fold["train"] + fold["val"])
    ec_info = json.loads((results / "runs" / "nnUNetTrainer@x2" / "labeled3_seed0" / "run_info.json").read_text())
    assert ec_info["epochs"] == 2 and "nnUNet_results@x2" in ec_info["output_folder"]
    cpcl_dir = results / "runs" / "nnUNetTrainerCPCL" / "labeled3_seed0"
    teacher = json.loads((cpcl_dir / "teacher.json").read_text())
    assert teacher["available"] is True and teacher["checkpoint"].endswith("checkpoint_final_teacher.pth")
    assert len(list((cpcl_dir / "test_predictions_teacher").glob("*.nii.gz"))) == 2
    run_dir = results / "runs" / "nnUNetTrainerCPCL" / "labeled3_seed0"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["metric_per_case"]) == 2 and {"Dice", "IoU", "HD95", "ASD"} <= set(metrics["foreground_mean"])
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["checkpoint"] == "final" and info["seconds_per_epoch_median"] > 0
    assert info["training_machines"] == [machine_name("cpu")]  # what the cost table's ratios were measured on
    curves = json.loads((run_dir / "curves.json").read_text())
    assert "ssl_loss_bpc" in curves
    assert "predicting test cases" in (run_dir / "log.txt").read_text()  # progress of the prediction phase
    # the trainer used exactly the fold's unlabeled cases and the manifest's, and says which
    (config_file,) = (results / "nnUNet_results").rglob("nnUNetTrainerCPCL__*/fold_*/nnunet_proto_config.json")
    ids = json.loads(config_file.read_text())["unlabeled"]["case_ids"]
    manifest = json.loads((synthetic_dataset.preprocessed / "nnUNetPlans_2d_unlabeled.json").read_text())
    fold = json.loads((synthetic_dataset.preprocessed / "splits_final.json").read_text())[runs[0]["fold"]]
    assert ids == {"folder": manifest["cases"], "split": sorted(fold["unlabeled"])}
    # postprocessing: determined by nnU-Net on the run's own validation predictions, applied to the test predictions
    pp = json.loads((run_dir / "postprocessing.json").read_text())
    assert pp["available"] is True and isinstance(pp["steps"], list)
    fold_dir = next((results / "nnUNet_results").rglob("nnUNetTrainerCPCL__*/fold_*"))
    assert (fold_dir / "validation" / "postprocessing.pkl").is_file()
    assert len(list((run_dir / "test_predictions_postprocessed").glob("*.nii.gz"))) == 2
    pp_metrics = json.loads((run_dir / "metrics_postprocessed.json").read_text())
    assert len(pp_metrics["metric_per_case"]) == 2
    assert pp_metrics["foreground_mean"]["Dice"] == pytest.approx(pp["test_foreground_dice"], nan_ok=True)
    row = summary["comparisons"][0]
    assert row["trainer"] == "nnUNetTrainerCPCL" and row["labeled_amount"] == "3" and row["seeds"] == [0]
    assert row["raw"]["n_pairs"] == 2 and row["postprocessed"]["n_pairs"] == 2
    assert row["total_steps_per_run"] == 3 and "p_bootstrap" in row["raw"] and "dice_ci95" in row["postprocessed"]
    stamp = (run_dir / "metrics.json").stat().st_mtime

    # a second invocation skips finished runs (nothing retrained, metrics untouched)
    out = run_cli(*args)
    assert (run_dir / "metrics.json").stat().st_mtime == stamp
    log = (run_dir / "log.txt").read_text()
    assert log.count("RUN DONE") == 1
    del out

    # a folder left by the code before the postprocessing stage (and a spec file without the control field) is
    # completed on resume: no retraining, no re-prediction, postprocessing determined and evaluated
    for f in ("postprocessing.json", "metrics_postprocessed.json"):
        (run_dir / f).unlink()
    shutil.rmtree(run_dir / "test_predictions_postprocessed")
    for f in ("postprocessing.pkl", "postprocessing.json"):
        (fold_dir / "validation" / f).unlink()
    spec_file = results / "benchmark_spec.json"
    old_spec = json.loads(spec_file.read_text())
    del old_spec["control"]
    spec_file.write_text(json.dumps(old_spec))
    pred_stamp = next((run_dir / "test_predictions").glob("*.nii.gz")).stat().st_mtime
    run_cli(*args)
    log = (run_dir / "log.txt").read_text()
    assert log.count("RUN DONE") == 2 and "training already finished" in log.split("RUN DONE")[1]
    assert (run_dir / "metrics.json").stat().st_mtime == stamp
    assert next((run_dir / "test_predictions").glob("*.nii.gz")).stat().st_mtime == pred_stamp
    assert json.loads((run_dir / "postprocessing.json").read_text())["available"] is True
    assert (fold_dir / "validation" / "postprocessing.pkl").is_file()
    plain_log = (results / "runs" / "nnUNetTrainer" / "labeled3_seed0" / "log.txt").read_text()
    assert plain_log.count("RUN DONE") == 1  # the finished plain run was not touched

    # changing the budget of an existing benchmark is refused
    changed = list(args)
    changed[changed.index("--epochs") + 1] = "2"
    from nnunet_proto.cli import main

    assert main(changed) == 2
    # ... and so is switching test-time mirroring back on (the test predictions would differ)
    assert main([a for a in args if a != "--disable-tta"]) == 2
    # the dataset by name is the same benchmark as by id: resumes (nothing to do)
    by_name = list(args)
    by_name[by_name.index("-d") + 1] = synthetic_dataset.name
    assert main(by_name) == 0
    assert (run_dir / "log.txt").read_text().count("RUN DONE") == 2


def test_benchmark_refuses_another_test_set_and_reevaluates_on_request(benchmark_args, synthetic_dataset,
                                                                        tmp_path, capsys):
    """Issue 24 item 2: resuming a finished benchmark with other --test-images/--test-labels must not report the
    old numbers under the new test set."""
    from nnunet_proto.cli import main

    args, results, report = benchmark_args
    args = args[:args.index("--self-training")] + ["-tr", "nnUNetTrainer"]  # plain only: cheap
    args[args.index("nnUNetTrainerCPCL")] = "nnUNetTrainer"
    run_cli(*args)
    run_dir = results / "runs" / "nnUNetTrainer" / "labeled3_seed0"
    before = (run_dir / "metrics.json").read_bytes()
    images, labels = tmp_path / "imagesTs", tmp_path / "labelsTs"
    shutil.copytree(synthetic_dataset.raw / "imagesTs", images)
    shutil.copytree(synthetic_dataset.raw / "labelsTs", labels)
    gone = sorted(labels.iterdir())[0]
    gone.unlink()
    for f in images.glob(gone.name.replace(".nii.gz", "_*.nii.gz")):
        f.unlink()
    other = args + ["--test-images", str(images), "--test-labels", str(labels)]
    capsys.readouterr()
    assert main(other) == 2
    err = capsys.readouterr().err
    assert "evaluated on another test set" in err and "--reevaluate-test-set" in err and "1 gone" in err
    assert (run_dir / "metrics.json").read_bytes() == before  # nothing touched
    assert main(other + ["--reevaluate-test-set"]) == 0
    assert len(json.loads((run_dir / "metrics.json").read_text())["metric_per_case"]) == 1
    (old,) = (run_dir / "superseded").iterdir()
    assert (old / "metrics.json").read_bytes() == before and (old / "test_predictions").is_dir()
    assert (run_dir / "log.txt").read_text().count("Epoch 0") == 1  # evaluated again, not retrained


def test_benchmark_flags_are_checked_before_anything_runs(benchmark_args, capsys):
    from nnunet_proto.cli import main

    args, results, _ = benchmark_args
    for change, needle in ((["-device", "tpu7"], "-device 'tpu7'"), (["--seeds", "-1"], "--seeds"),
                           (["--equal-compute", "2.5", "--equal-compute-source", " "], "--equal-compute-source")):
        code = None
        try:
            code = main(args + change)  # the last of a repeated flag wins
        except SystemExit as e:  # argparse: exit 2 with the flag named
            code = e.code
        assert code == 2 and needle in capsys.readouterr().err, change
    assert not results.exists()
    # --forget with a trainer that has no runs names it and drops nothing
    results.mkdir(parents=True)
    (results / "benchmark_spec.json").write_text(BenchmarkSpec(
        dataset="1", configuration="2d", plans="p", trainers=("nnUNetTrainerCPCL",), amounts=("3",), seeds=(0,),
        test_images=".", test_labels=".", epochs=1, iterations_per_epoch=1).to_json())
    (results / "runs.json").write_text(json.dumps([{"trainer": "nnUNetTrainerCPCL", "amount": "3", "seed": 0,
                                                     "fold": 5}]))
    assert main(["benchmark", "--results-dir", str(results), "--forget", "nnUNetTrainerCPLC"]) == 2
    err = capsys.readouterr().err
    assert "nnUNetTrainerCPLC" in err and "did you mean nnUNetTrainerCPCL" in err
    assert len(json.loads((results / "runs.json").read_text())) == 1


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


def test_warm_start_loads_every_weight_of_the_finished_plain_run(synthetic_dataset, fresh_results, tmp_path):
    """A warm-started trainer in the benchmark starts from the plain run of its fold: every weight of plain's
    checkpoint_final.pth (the heads included), recorded with its hash; other trainers are not warm-started."""
    from conftest import build_trainer

    from nnunet_proto.benchmark.run_one import load_warm_start, recorded_warm_start
    from nnunet_proto.data.pseudo_labels import file_sha256
    from nnunet_proto.training.compat import unwrap_network
    from nnunet_proto.training.stage_switch import warm_starts

    plain = build_trainer("nnUNetTrainer", synthetic_dataset)
    plain.initialize()
    fold_dir = tmp_path / "plain_fold"
    fold_dir.mkdir()
    ckpt = fold_dir / "checkpoint_final.pth"
    plain.save_checkpoint(str(ckpt))
    plain_run = tmp_path / "runs" / "nnUNetTrainer" / "labeled2_seed0"
    plain_run.mkdir(parents=True)
    for f in ("metrics.json", "postprocessing.json"):
        (plain_run / f).write_text("{}")
    (plain_run / "run_info.json").write_text(json.dumps({"output_folder": str(fold_dir)}))
    trainer = build_trainer("nnUNetTrainerBCP_warm", synthetic_dataset)
    assert warm_starts(trainer) and not warm_starts(build_trainer("nnUNetTrainerBCP", synthetic_dataset))
    run_dir = tmp_path / "runs" / "nnUNetTrainerBCP_warm" / "labeled2_seed0"
    run_dir.mkdir(parents=True)
    record = {"file": str(ckpt), "sha256": file_sha256(ckpt)}
    assert recorded_warm_start(run_dir) is None
    assert load_warm_start(trainer, plain_run, run_dir) == record
    assert recorded_warm_start(run_dir) == record  # a process that resumes the run reads it back
    expected = unwrap_network(plain.network).state_dict()
    loaded = unwrap_network(trainer.network).state_dict()
    assert any(".seg_layers." in k for k in expected)
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_warm_start_refuses_a_plain_run_that_did_not_finish(tmp_path):
    """A warm-started trainer must not start from an unfinished (or failed) plain run."""
    from nnunet_proto.benchmark.run_one import load_warm_start

    plain_run = tmp_path / "runs" / "nnUNetTrainer" / "labeled2_seed0"
    plain_run.mkdir(parents=True)
    (plain_run / "metrics.json").write_text("{}")
    with pytest.raises(RuntimeError, match="warm-started from plain nnU-Net.*has not finished"):
        load_warm_start(object(), plain_run)


def test_runs_that_need_the_plain_checkpoint_run_right_after_plain(synthetic_dataset, tmp_path):
    """Plain's checkpoint does not travel with --export-runs, so on a machine that is not kept its dependents
    (self-training students, warm-started trainers) must start in the session that trained plain: each fold runs
    plain, then them, then the A/A control and the other trainers in the order given, then plain at equal compute."""
    from nnunet_proto.benchmark.lookup import trainer_warm_starts
    from nnunet_proto.benchmark.runner import prepare
    from nnunet_proto.benchmark.spec import CONTROL, PLAIN, SELF_TRAINING

    trainers = ("nnUNetTrainerMeanTeacher", "nnUNetTrainerBCP_warm", "nnUNetTrainerCPCL", "nnUNetTrainerMPER_warm",
                SELF_TRAINING)
    assert [t for t in (PLAIN, CONTROL) + trainers if trainer_warm_starts(t)] == ["nnUNetTrainerBCP_warm",
                                                                                  "nnUNetTrainerMPER_warm"]
    spec = BenchmarkSpec(dataset=str(synthetic_dataset.id), configuration="2d", plans=synthetic_dataset.plans,
                         trainers=trainers, amounts=("3",), seeds=(0, 1),
                         test_images=str(synthetic_dataset.raw / "imagesTs"),
                         test_labels=str(synthetic_dataset.raw / "labelsTs"), epochs=1, iterations_per_epoch=1,
                         equal_compute=2.0, equal_compute_source="a test")
    runs = prepare(spec, tmp_path / "bench")
    expected = [PLAIN, "nnUNetTrainerBCP_warm", "nnUNetTrainerMPER_warm", SELF_TRAINING, CONTROL,
                "nnUNetTrainerMeanTeacher", "nnUNetTrainerCPCL", PLAIN + "@x2"]
    assert [r.row for r in runs] == expected * 2
    assert [r.seed for r in runs] == [0] * 8 + [1] * 8
    # without the trainer lookup (the report's planned rows) only the self-training student moves
    assert [r.trainer for r in spec.runs_of("3", 0, 5)][:3] == [PLAIN, SELF_TRAINING, CONTROL]


def test_a_resume_without_equal_compute_or_notes_keeps_the_saved_ones(tmp_path):
    """A stage resumed without --equal-compute must not drop the equal-compute row's report section (the saved spec
    is what --report-only and --export-runs read); a factor or notes given anew replace the saved ones."""
    import dataclasses

    from nnunet_proto.benchmark.runner import keep_saved_settings
    from nnunet_proto.benchmark.spec import SPEC_FILE

    base = BenchmarkSpec(dataset="1", configuration="2d", plans="p", trainers=("nnUNetTrainerX",), amounts=("4",),
                         seeds=(0,), test_images="ti", test_labels="tl", epochs=1, iterations_per_epoch=1)
    assert keep_saved_settings(base, tmp_path) == base  # nothing saved yet
    saved = dataclasses.replace(base, equal_compute=3.4, equal_compute_source="BCP_warm's time", notes="why")
    (tmp_path / SPEC_FILE).write_text(saved.to_json())
    resumed = keep_saved_settings(base, tmp_path)
    assert (resumed.equal_compute, resumed.equal_compute_source, resumed.notes) == (3.4, "BCP_warm's time", "why")
    assert [r.row for r in resumed.runs_of("4", 0, 5)][-1] == "nnUNetTrainer@x3.4"
    anew = dataclasses.replace(base, equal_compute=4.2, equal_compute_source="new", notes="now")
    assert keep_saved_settings(anew, tmp_path) == anew


def test_self_training_refuses_a_teacher_run_that_did_not_finish(tmp_path):
    """A plain run that failed after training has no postprocessing yet: its pseudo labels would silently be raw
    argmax maps, so nothing is predicted until the plain row has finished."""
    import torch

    from nnunet_proto.benchmark.run_one import pseudo_label

    spec = BenchmarkSpec(dataset="1", configuration="2d", plans="p", trainers=(), amounts=("2",), seeds=(0,),
                         test_images=".", test_labels=".", epochs=1, iterations_per_epoch=1)
    plain_run = tmp_path / "runs" / "nnUNetTrainer" / "labeled2_seed0"
    plain_run.mkdir(parents=True)
    (plain_run / "metrics.json").write_text("{}")  # evaluated, but not post-processed
    with pytest.raises(RuntimeError, match="has not finished.*run the same benchmark command again"):
        pseudo_label(spec, 5, torch.device("cpu"), plain_run)

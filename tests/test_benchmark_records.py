"""Carrying a benchmark's finished runs to another machine (benchmark/records.py): export, import, refusals.

The runs are hand-made (per-case metrics as in test_benchmark_stats); the dataset, plans, folds and test set are
the session's synthetic dataset, copied per test so that a test may damage its plans or test labels.
"""
import gzip
import json
import os
import shutil

import numpy as np
import pytest
from conftest import PLANS, run_cli
from test_benchmark_stats import _write_run

from nnunet_proto.benchmark.ablation import validation_per_class
from nnunet_proto.benchmark.records import IMPORTED_FILE, VALIDATION_SUMMARY, export_runs, import_runs
from nnunet_proto.benchmark.report import write_report
from nnunet_proto.benchmark.results import Results
from nnunet_proto.benchmark.run_one import load_warm_start, pseudo_label
from nnunet_proto.benchmark.spec import PLAIN, SPEC_FILE, BenchmarkSpec, Run, load_runs, run_finished
from nnunet_proto.data import leakage
from nnunet_proto.data.splits import LabeledAmount, make_label_scarce_fold

TRAINER = "nnUNetTrainerX"
ISLANDS = {lab: {"components": 2.5, "outside_largest": 0.1} for lab in ("1", "2")}


def _benchmark(root, raw, pre, seeds=(0, 1), epochs=2):
    """A finished benchmark of plain and TRAINER on labeled 3, as run_benchmark leaves it (records only)."""
    spec = BenchmarkSpec(dataset=raw.name, configuration="2d", plans=PLANS, trainers=(TRAINER,), amounts=("3",),
                         seeds=tuple(seeds), test_images=str(raw / "imagesTs"), test_labels=str(raw / "labelsTs"),
                         epochs=epochs, iterations_per_epoch=5, control=None)
    root.mkdir(parents=True)
    (root / SPEC_FILE).write_text(spec.to_json())
    identity = leakage.test_set_identity(raw / "imagesTs", raw / "labelsTs", ".nii.gz", None)
    (root / "test_set.json").write_text(json.dumps(identity))
    rng, runs = np.random.default_rng(0), []
    for seed in seeds:
        fold, _ = make_label_scarce_fold(str(pre), LabeledAmount.parse("3"), seed, file_ending=".nii.gz")
        plain = rng.uniform(0.4, 0.7, 8)
        for trainer, shift in ((PLAIN, 0.0), (TRAINER, 0.05)):
            runs.append(Run(trainer, "3", seed, fold))
            d = _write_run(root, trainer, "3", seed, list(plain + shift), pp_dice=list(plain + shift + 0.01),
                           val=0.6 + shift)
            (d / VALIDATION_SUMMARY).write_text(json.dumps({"foreground_mean": {"Dice": 0.6 + shift},
                                                            "mean": {"1": {"Dice": 0.5 + shift},
                                                                     "2": {"Dice": 0.7 + shift}}}))
            # the test predictions (they stay behind on export) and their islands cache (it travels)
            (d / "test_predictions").mkdir()
            (d / "test_predictions" / "case.nii.gz").write_bytes(b"not travelling")
            (d / "islands.json").write_text(json.dumps({"key": {"labels": [1, 2], "files": ["case.nii.gz"]},
                                                        "islands": {"mean": ISLANDS}}))
    teacher = Run(TRAINER, "3", seeds[0], 0).dir(root / "runs")  # one run's EMA teacher row travels with it
    shutil.copy(teacher / "metrics.json", teacher / "metrics_teacher.json")
    (teacher / "teacher.json").write_text(json.dumps({"available": False, "reason": "no validation predictions"}))
    (root / "runs.json").write_text(json.dumps([r.to_json() for r in runs]))
    return spec


@pytest.fixture
def exported(copied, tmp_path):
    raw, pre = copied
    spec = _benchmark(tmp_path / "here", raw, pre)
    bundle = tmp_path / "runs.json.gz"
    done = export_runs(tmp_path / "here", bundle, pre)
    return spec, bundle, done, raw, pre


def test_export_then_import_gives_the_same_report(copied, tmp_path):
    raw, pre = copied
    spec = _benchmark(tmp_path / "here", raw, pre)
    # one run whose island counts were never computed (no report yet): the export counts them in its predictions
    counted = Run(PLAIN, "3", 1, 0).dir(tmp_path / "here" / "runs")
    (counted / "islands.json").unlink()
    (counted / "test_predictions" / "case.nii.gz").unlink()
    for label in (raw / "labelsTs").glob("*.nii.gz"):
        shutil.copy(label, counted / "test_predictions" / label.name)
    # ... and its final validation predictions in nnU-Net's fold folder: counted at export too, the count travels
    validation = tmp_path / "nnunet_results" / "fold_0" / "validation"
    validation.mkdir(parents=True)
    for label in (raw / "labelsTs").glob("*.nii.gz"):
        shutil.copy(label, validation / label.name)
    info = json.loads((counted / "run_info.json").read_text())
    (counted / "run_info.json").write_text(json.dumps({**info, "output_folder": str(validation.parent)}))
    bundle = tmp_path / "runs.json.gz"
    done = export_runs(tmp_path / "here", bundle, pre)
    assert len(done["exported"]) == 4 and done["unfinished"] == []
    data = json.loads(gzip.decompress(bundle.read_bytes()))
    assert all("test_predictions" not in name for e in data["runs"] for name in e["files"])
    assert bundle.stat().st_size < 20_000

    there = tmp_path / "there"
    out = import_runs(there, bundle, pre, raw / "imagesTs", raw / "labelsTs")
    assert sorted(out["imported"]) == sorted(done["exported"]) and out["kept"] == out["in_progress"] == []
    runs = load_runs(there / "runs.json")
    assert {r.tag for r in runs} == set(done["exported"])
    for run in runs:
        d = run.dir(there / "runs")
        assert run_finished(d) and (d / IMPORTED_FILE).is_file() and not (d / "test_predictions").exists()
        assert json.loads((d / IMPORTED_FILE).read_text())["fold_cases"]["train"]
    a = json.loads((write_report(spec, tmp_path / "here", tmp_path / "ra").parent / "summary.json").read_text())
    readme = write_report(spec, there, tmp_path / "rb")
    b = json.loads((readme.parent / "summary.json").read_text())
    assert a["comparisons"] == b["comparisons"] and a["means"] == b["means"]
    assert f"{TRAINER}@teacher|3" in b["means"]
    # the EMA teacher's row is part of its run: 4 runs, not 5
    assert a["runs"]["finished"] == b["runs"]["finished"] == 4 and a["runs"]["imported"] == []
    assert {(r["trainer"], r["seed"]) for r in b["runs"]["imported"]} == {(t, s) for t in (PLAIN, TRAINER)
                                                                          for s in (0, 1)}
    text = readme.read_text()
    assert "Runs finished: 4/4." in text and "**4 run(s) trained on another machine**" in text
    res = Results(BenchmarkSpec.from_json((there / SPEC_FILE).read_text()), there)
    key = (TRAINER, "3", 0)
    assert res.islands[key] == ISLANDS  # from the records: the predictions stayed behind
    assert res.islands[(PLAIN, "3", 1)].keys() == {"1", "2"}  # counted at export
    shutil.rmtree(validation)  # nnU-Net's folder stays on the training machine; its count came with the records
    res = Results(BenchmarkSpec.from_json((there / SPEC_FILE).read_text()), there)
    assert res.validation_islands[(PLAIN, "3", 1)] == res.islands[(PLAIN, "3", 1)]  # the same label files
    assert (PLAIN, "3", 0) not in res.validation_islands  # no validation folder, no cache: no row
    assert validation_per_class(res.info[key]) == pytest.approx({"fg": 0.65, "1": 0.55, "2": 0.75})

    again = import_runs(there, bundle, pre, raw / "imagesTs", raw / "labelsTs")
    assert again["imported"] == [] and sorted(again["kept"]) == sorted(done["exported"])
    # an imported run exports again with its origin (a chain of machines)
    chained = export_runs(there, tmp_path / "chained.json", pre)
    first = json.loads((tmp_path / "chained.json").read_text())["runs"][0]["files"][IMPORTED_FILE]
    assert len(chained["exported"]) == 4 and first["bundle"] == str(bundle)


def test_import_keeps_finished_and_started_runs_here(exported, tmp_path):
    spec, bundle, done, raw, pre = exported
    there = tmp_path / "there"
    plain0 = Run(PLAIN, "3", 0, 0).dir(there / "runs")
    _write_run(there, PLAIN, "3", 0, [0.9] * 8, pp_dice=[0.9] * 8)
    started = Run(TRAINER, "3", 1, 0).dir(there / "runs")
    started.mkdir(parents=True)
    (started / "log.txt").write_text("epoch 3")
    out = import_runs(there, bundle, pre, raw / "imagesTs", raw / "labelsTs")
    assert out["kept"] == [Run(PLAIN, "3", 0, 0).tag] and out["in_progress"] == [Run(TRAINER, "3", 1, 0).tag]
    assert len(out["imported"]) == 2 and not (plain0 / IMPORTED_FILE).exists()
    assert json.loads((plain0 / "metrics.json").read_text())["metric_per_case"][0]["metrics"]["1"]["Dice"] == 0.9
    assert not (started / "metrics.json").exists()


def _runs_json(root):
    return (root / "runs.json").read_text() if (root / "runs.json").is_file() else None


def test_import_refuses_another_budget_plans_test_set_or_fold(exported, tmp_path):
    spec, bundle, done, raw, pre = exported
    there = tmp_path / "there"
    _benchmark(there, raw, pre, seeds=(0,), epochs=3)  # a benchmark here with another budget
    before = _runs_json(there)
    with pytest.raises(ValueError, match="epochs: 2 in the bundle, 3 here"):
        import_runs(there, bundle, pre, raw / "imagesTs", raw / "labelsTs")
    assert _runs_json(there) == before

    fresh = tmp_path / "fresh"
    labels = tmp_path / "labelsTs"
    shutil.copytree(raw / "labelsTs", labels)
    first = sorted(labels.iterdir())[0]
    first.write_bytes(sorted((raw / "labelsTr").iterdir())[0].read_bytes())  # other voxels under the same name
    with pytest.raises(ValueError, match="another test set"):
        import_runs(fresh, bundle, pre, raw / "imagesTs", labels)
    assert _runs_json(fresh) is None and not (fresh / SPEC_FILE).exists()

    data = json.loads(gzip.decompress(bundle.read_bytes()))
    data["runs"][0]["fold_cases"]["train"] = ["someone_else"]
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="trained on other cases"):
        import_runs(fresh, tampered, pre, raw / "imagesTs", raw / "labelsTs")
    assert _runs_json(fresh) is None

    plans = pre / f"{PLANS}.json"
    plans.write_text(plans.read_text().replace('"batch_size": ', '"batch_size": 1'))
    with pytest.raises(ValueError, match="differs from the plans"):
        import_runs(fresh, bundle, pre, raw / "imagesTs", raw / "labelsTs")
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(ValueError, match="not a bundle"):
        import_runs(fresh, tmp_path / "junk.json", pre, raw / "imagesTs", raw / "labelsTs")
    assert _runs_json(fresh) is None


def test_a_run_that_needs_plains_weights_refuses_an_imported_plain(exported, tmp_path):
    spec, bundle, done, raw, pre = exported
    there = tmp_path / "there"
    import_runs(there, bundle, pre, raw / "imagesTs", raw / "labelsTs")
    plain = Run(PLAIN, "3", 0, 0).dir(there / "runs")
    with pytest.raises(RuntimeError, match=r"imported from .* without its checkpoint\. Move .* aside"):
        load_warm_start(object(), plain)
    with pytest.raises(RuntimeError, match="self-training row needs the weights"):
        pseudo_label(spec, 0, None, plain)


def test_cli_exports_and_imports_and_writes_the_report(exported, tmp_path):
    spec, _, _, raw, pre = exported
    bundle = tmp_path / "cli_runs.json"
    run_cli("benchmark", "--results-dir", str(tmp_path / "here"), "--export-runs", str(bundle))
    assert len(json.loads(bundle.read_text())["runs"]) == 4
    out = run_cli("benchmark", "--results-dir", str(tmp_path / "there"), "-o", str(tmp_path / "report"),
                  "--import-runs", str(bundle))
    assert out.strip().endswith("README.md") and (tmp_path / "report" / "summary.json").is_file()
    saved = BenchmarkSpec.from_json((tmp_path / "there" / SPEC_FILE).read_text())
    assert saved.budget_key() == spec.budget_key() and saved.test_labels == str(raw / "labelsTs")


def test_budget_differences_name_each_field_and_accept_the_dataset_by_id(copied, tmp_path):
    """The one budget check of a resumed benchmark (runner.prepare) and of an import: -d 801 is Dataset801_*."""
    import dataclasses

    raw, pre = copied
    spec = _benchmark(tmp_path / "here", raw, pre)
    assert spec.budget_differences(dataclasses.replace(spec, dataset="801")) == {}
    assert spec.budget_differences(dataclasses.replace(spec, epochs=3, precision="bf16")) == {
        "epochs": (2, 3), "precision": ("fp32", "bf16")}


def test_a_run_records_every_machine_that_trained_it(tmp_path):
    """run_one records the machine before training starts (a resumed run elsewhere adds its own, once)."""
    from nnunet_proto.benchmark.records import TRAINING_MACHINES_FILE, machine_name, record_training_machine

    name = machine_name("cpu")
    assert name.endswith(f"({os.cpu_count()} logical CPUs)") and not name.startswith(" (")
    assert record_training_machine(tmp_path, name) == [name]
    assert record_training_machine(tmp_path, "other CPU") == [name, "other CPU"]
    assert record_training_machine(tmp_path, name) == [name, "other CPU"]
    assert json.loads((tmp_path / TRAINING_MACHINES_FILE).read_text()) == [name, "other CPU"]

"""Results you can trust (issue 24, items 4, 7, 8, the tracebacks and the smaller things): each bad input is met
where a user meets it (the CLI, or the trainer's start), refused with one line that names the file or flag and the
way out, and nothing is lost (plans, manifests, results and unrelated files are byte-identical afterwards).

The session dataset is never damaged: every test works on private copies. Tests run as root here, and root ignores
file permissions, so a permission error is injected (``open`` refuses one path) unless the test runs as a user.
"""
import builtins
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import DATASET_ID, PLANS, TINY_PATCH, build_trainer

from nnunet_proto.cli import main
from nnunet_proto.data import unlabeled_preprocessing
from nnunet_proto.training.unlabeled import read_manifest

MANIFEST_2D = "nnUNetPlans_2d_unlabeled.json"
FOLDER_2D = "nnUNetPlans_2d_unlabeled"
PREPROCESS = ["preprocess-unlabeled", "-d", str(DATASET_ID), "-c", "2d", "-p", PLANS]




def checksums(*roots: Path) -> dict:
    """{path: sha256} of every file under the given files/folders (what must stay unchanged)."""
    out = {}
    for root in roots:
        for p in sorted([root] if root.is_file() else root.rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def deny_open(monkeypatch, path: Path, for_writing_only: bool = False) -> None:
    """Make opening ``path`` (a file, or anything under a folder) fail with a permission error, as for a user
    without the rights: a real chmod when not root, an injected PermissionError as root (root ignores modes)."""
    if os.geteuid() != 0 and not for_writing_only:
        path.chmod(0)
        return
    real_open = builtins.open
    target = os.path.realpath(path)

    def guarded(file, mode="r", *args, **kwargs):
        name = os.path.realpath(os.fspath(file)) if isinstance(file, (str, bytes, os.PathLike)) else ""
        hit = name == target or name.startswith(target + os.sep)
        if hit and (not for_writing_only or any(c in mode for c in "wax+")):
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)


def trainer_cases(ds):
    """The imagesUnlabeled cases nnUNetTrainerCPCL would train on (its own start-of-training lookup; the fold's
    split cases left out)."""
    return [c for c in build_trainer("nnUNetTrainerCPCL", ds).find_unlabeled_cases() if c.source == "folder"]


# ---------------------------------------------------------------- 4. training uses only what it should
def test_training_refuses_when_imagesUnlabeled_was_moved_away(copied, synthetic_dataset, fresh_results):
    raw, pre = copied
    before = checksums(pre / MANIFEST_2D, pre / FOLDER_2D)
    assert len(trainer_cases(synthetic_dataset)) == 3  # intact: trains on the 3 unlabeled cases
    (raw / "imagesUnlabeled").rename(raw.parent / "moved_away")
    with pytest.raises(FileNotFoundError) as err:
        trainer_cases(synthetic_dataset)
    msg = str(err.value)
    assert f"{raw / 'imagesUnlabeled'} does not exist" in msg and "every case vanished" in msg
    assert "Put the folder back" in msg and f"delete {pre / FOLDER_2D} and {pre / MANIFEST_2D}" in msg
    assert checksums(pre / MANIFEST_2D, pre / FOLDER_2D) == before


@pytest.mark.parametrize("as_name", ["unl_001", "test_099"])
def test_training_refuses_an_unlabeled_case_copied_into_the_test_set(as_name, copied, synthetic_dataset,
                                                                      fresh_results, capsys):
    """Same id in imagesTs/labelsTs, or the same voxels under a test name: the trainer refuses at start, like
    preprocess-unlabeled (which now re-checks the cases it keeps, not only new ones)."""
    raw, pre = copied
    before = checksums(pre / MANIFEST_2D, pre / FOLDER_2D)
    shutil.copy(raw / "imagesUnlabeled" / "unl_001_0000.nii.gz", raw / "imagesTs" / f"{as_name}_0000.nii.gz")
    shutil.copy(raw / "labelsTs" / "test_000.nii.gz", raw / "labelsTs" / f"{as_name}.nii.gz")
    with pytest.raises(ValueError) as err:
        trainer_cases(synthetic_dataset)
    msg = str(err.value)
    why = "unl_001: a test case id in imagesTs/labelsTs" if as_name == "unl_001" else \
        f"unl_001: identical voxels to the test image(s) ['{as_name}_0000.nii.gz'] in imagesTs"
    assert "test leakage" in msg and why in msg and str(pre / MANIFEST_2D) in msg
    assert f"preprocess-unlabeled -d {synthetic_dataset.name} -c 2d -p {PLANS}" in msg

    assert main(PREPROCESS) == 2
    err_text = capsys.readouterr().err
    assert ("also exist in imagesTs/labelsTs" if as_name == "unl_001" else why) in err_text
    assert checksums(pre / MANIFEST_2D, pre / FOLDER_2D) == before


def test_stale_data_hint_names_the_plans(copied, synthetic_dataset, fresh_results):
    _, pre = copied
    manifest = json.loads((pre / MANIFEST_2D).read_text())
    manifest["fingerprint"] = "0000"
    (pre / MANIFEST_2D).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"stale.*`nnunet_proto preprocess-unlabeled -d {synthetic_dataset.name} "
                                         rf"-c 2d -p {PLANS} --overwrite`"):
        trainer_cases(synthetic_dataset)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"cases": "unl_000"}'])
def test_damaged_manifest_is_named_and_overwrite_repairs_it(content, copied, synthetic_dataset, fresh_results,
                                                            capsys):
    raw, pre = copied
    (pre / MANIFEST_2D).write_text(content)
    before = checksums(pre / FOLDER_2D)
    with pytest.raises(ValueError, match=rf"manifest {pre / MANIFEST_2D} is damaged.*-p {PLANS} --overwrite"):
        trainer_cases(synthetic_dataset)
    assert main(PREPROCESS) == 2
    err = capsys.readouterr().err
    assert f"the unlabeled manifest {pre / MANIFEST_2D} is damaged" in err and "--overwrite" in err
    assert "Traceback" not in err and (pre / MANIFEST_2D).read_text() == content
    assert checksums(pre / FOLDER_2D) == before
    assert main(PREPROCESS + ["--overwrite"]) == 0  # the documented repair
    assert read_manifest(str(pre / MANIFEST_2D))["cases"] == ["unl_000", "unl_001", "unl_002"]
    assert len(trainer_cases(synthetic_dataset)) == 3


# ---------------------------------------------------------------- 7. plans-patch never loses plans
def _patch(tmp_path, plans_name, batch_size=1):
    patch = json.loads(TINY_PATCH.read_text())
    patch["plans_name"] = plans_name
    patch["configurations"]["2d"]["batch_size"] = batch_size
    path = tmp_path / f"{plans_name}_patch.json"
    path.write_text(json.dumps(patch))
    return path


def test_plans_patch_never_overwrites_its_source_or_other_plans(copied, tmp_path, capsys):
    _, pre = copied
    before = checksums(pre / "nnUNetPlans.json", pre / f"{PLANS}.json")
    assert main(["plans-patch", "-d", str(DATASET_ID), str(_patch(tmp_path, "nnUNetPlans")), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"would overwrite its own source {pre / 'nnUNetPlans.json'}" in err

    # a re-run (setup scripts run plans-patch every time): identical content is fine, nothing is written
    assert main(["plans-patch", "-d", str(DATASET_ID), str(TINY_PATCH)]) == 0
    assert "unchanged (already up to date)" in capsys.readouterr().out
    # other content under an existing name: refused without --overwrite
    other = _patch(tmp_path, PLANS, batch_size=5)
    assert main(["plans-patch", "-d", str(DATASET_ID), str(other)]) == 2
    err = capsys.readouterr().err
    assert f"{pre / f'{PLANS}.json'} already exists with other content" in err and "--overwrite" in err
    assert checksums(pre / "nnUNetPlans.json", pre / f"{PLANS}.json") == before

    assert main(["plans-patch", "-d", str(DATASET_ID), str(other), "--overwrite"]) == 0
    assert json.loads((pre / f"{PLANS}.json").read_text())["configurations"]["2d"]["batch_size"] == 5
    assert checksums(pre / "nnUNetPlans.json") == {k: v for k, v in before.items() if k.endswith("nnUNetPlans.json")}


def test_plans_patch_given_a_folder_or_broken_json(copied, tmp_path, capsys):
    assert main(["plans-patch", "-d", str(DATASET_ID), str(tmp_path)]) == 2
    assert f"plan patch {tmp_path} is a folder" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    assert main(["plans-patch", "-d", str(DATASET_ID), str(broken)]) == 2
    assert f"plan patch {broken} is not valid JSON" in capsys.readouterr().err


def test_setup_scripts_run_plans_patch_without_overwrite():
    """acdc/la/quickstart re-run plans-patch on every setup: identical content passes (tested above); the scripts
    must not pass --overwrite, which would silently replace plans changed by hand."""
    from conftest import REPO

    for script in ("acdc_benchmark.sh", "la_benchmark.sh", "quickstart.sh"):
        lines = [line for line in (REPO / "scripts" / script).read_text().splitlines() if "plans-patch" in line]
        assert lines and not any("--overwrite" in line for line in lines), script


# ---------------------------------------------------------------- 8. evaluate never replaces unrelated results
@pytest.fixture
def eval_folders(synthetic_dataset, tmp_path, monkeypatch):
    """Reference and prediction folders (the test labels against themselves) and a spy on the evaluation."""
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    shutil.copytree(synthetic_dataset.raw / "labelsTs", ref)
    shutil.copytree(synthetic_dataset.raw / "labelsTs", pred)
    from nnunet_proto.evaluation import metrics

    calls = []
    real = metrics.evaluate_folders

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(metrics, "evaluate_folders", spy)
    return ref, pred, calls


def test_evaluate_refuses_to_replace_existing_results(eval_folders, tmp_path, capsys):
    ref, pred, calls = eval_folders
    keep = tmp_path / "keep.json"
    keep.write_text('{"mine": "an unrelated file"}')
    before = checksums(keep)
    args = ["evaluate", str(ref), str(pred), "-l", "1", "2", "-o", str(tmp_path / "keep.csv")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{keep} already exists" in err and "--overwrite" in err
    assert checksums(keep) == before and not (tmp_path / "keep.csv").exists() and not calls  # refused up front

    assert main(args + ["--overwrite"]) == 0
    assert json.loads(keep.read_text())["foreground_mean"]["Dice"] == 1.0 and (tmp_path / "keep.csv").is_file()
    assert main(["evaluate", str(ref), str(pred), "-l", "1", "2"]) == 0  # default: metrics.* beside predictions
    assert main(["evaluate", str(ref), str(pred), "-l", "1", "2"]) == 2  # a second time: refused
    assert f"{pred / 'metrics.json'} and {pred / 'metrics.csv'} already exist" in capsys.readouterr().err


def test_evaluate_checks_the_output_before_evaluating(eval_folders, tmp_path, monkeypatch, capsys):
    ref, pred, calls = eval_folders
    if Path("/sys").is_dir() and not os.access("/sys", os.W_OK) or os.path.ismount("/sys"):
        assert main(["evaluate", str(ref), str(pred), "-l", "1", "-o", "/sys/nnunet_proto_test/x.json"]) == 2
        err = capsys.readouterr().err
        assert "/sys/nnunet_proto_test" in err and "nothing was evaluated" in err and "Traceback" not in err

    read_only = tmp_path / "read_only"
    read_only.mkdir()
    if os.geteuid() != 0:
        read_only.chmod(0o555)
    else:  # root writes anywhere: the folder refuses the probe file instead
        import tempfile

        real = tempfile.mkstemp

        def mkstemp(*args, dir=None, **kwargs):
            if dir is not None and Path(dir) == read_only:
                raise PermissionError(13, "Permission denied", str(Path(dir) / "probe"))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    assert main(["evaluate", str(ref), str(pred), "-l", "1", "-o", str(read_only / "r.json")]) == 2
    err = capsys.readouterr().err
    assert f"{read_only}: cannot write into this folder (Permission denied); nothing was evaluated" in err
    assert not calls  # the evaluation never started

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert main(["evaluate", str(ref), str(pred), "-l", "1", "-o", str(a_file / "r.json")]) == 2
    assert f"{a_file} is a file, not a folder" in capsys.readouterr().err
    assert not calls and a_file.read_text() == "x"


# ---------------------------------------------------------------- tracebacks become one line naming the path
def test_folder_named_like_an_image_in_imagesUnlabeled(copied, capsys):
    raw, pre = copied
    (raw / "imagesUnlabeled" / "unl_050_0000.nii.gz").mkdir()
    before = checksums(pre / MANIFEST_2D, pre / FOLDER_2D)
    assert main(PREPROCESS) == 2
    err = capsys.readouterr().err
    assert f"{raw / 'imagesUnlabeled' / 'unl_050_0000.nii.gz'}: a folder named like an image" in err
    assert "--skip-bad" in err and "Traceback" not in err
    assert checksums(pre / MANIFEST_2D, pre / FOLDER_2D) == before
    assert main(PREPROCESS + ["--skip-bad"]) == 0
    assert "WARNING: skipping unlabeled case unl_050" in capsys.readouterr().err


def test_unreadable_unlabeled_image_is_refused_or_skipped(copied, monkeypatch, capsys):
    raw, pre = copied
    image = raw / "imagesUnlabeled" / "unl_051_0000.nii.gz"
    shutil.copy(raw / "imagesTr" / "case_000_0000.nii.gz", image)
    deny_open(monkeypatch, image)
    before = checksums(pre / MANIFEST_2D, pre / FOLDER_2D)
    assert main(PREPROCESS) == 2
    err = capsys.readouterr().err
    assert f"{image}: cannot be read (Permission denied)" in err and "--skip-bad" in err
    assert checksums(pre / MANIFEST_2D, pre / FOLDER_2D) == before
    assert main(PREPROCESS + ["--skip-bad"]) == 0
    assert "WARNING: skipping unlabeled case unl_051" in capsys.readouterr().err
    assert "unl_051" not in read_manifest(str(pre / MANIFEST_2D))["cases"]


def test_preprocessed_folder_not_writable(copied, monkeypatch, capsys):
    raw, pre = copied
    shutil.copy(raw / "imagesTr" / "case_000_0000.nii.gz", raw / "imagesUnlabeled" / "unl_052_0000.nii.gz")
    before = checksums(pre / MANIFEST_2D, pre / FOLDER_2D)
    deny_open(monkeypatch, pre, for_writing_only=True)
    assert main(PREPROCESS) == 2
    err = capsys.readouterr().err
    assert f"error: {pre / MANIFEST_2D}.tmp: Permission denied" in err and "Traceback" not in err
    assert checksums(pre / MANIFEST_2D, pre / FOLDER_2D) == before


def test_synthetic_output_that_is_a_file(tmp_path, capsys):
    a_file = tmp_path / "raw_root"
    a_file.write_text("keep me")
    assert main(["synthetic", "-d", "970", "--labeled", "2", "-o", str(a_file)]) == 2
    assert f"-o {a_file} is a file, not a folder" in capsys.readouterr().err
    assert a_file.read_text() == "keep me"


def test_ctrl_c_prints_what_was_kept_and_how_to_resume(copied, monkeypatch, capsys):
    raw, pre = copied
    for i in (70, 71):
        shutil.copy(raw / "imagesTr" / f"case_00{i - 70}_0000.nii.gz",
                    raw / "imagesUnlabeled" / f"unl_0{i}_0000.nii.gz")
    real = unlabeled_preprocessing._preprocess_one

    def ctrl_c_on_second(job):
        if job[0] == "unl_071":
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(unlabeled_preprocessing, "_preprocess_one", ctrl_c_on_second)
    assert main(PREPROCESS) == 130
    err = capsys.readouterr().err
    assert "nnunet_proto preprocess-unlabeled: interrupted; the cases finished so far are kept" in err
    assert f"Resume with: nnunet_proto preprocess-unlabeled -d {DATASET_ID} -c 2d -p {PLANS}" in err
    assert "Traceback" not in err
    assert "unl_070" in read_manifest(str(pre / MANIFEST_2D))["cases"]
    monkeypatch.setattr(unlabeled_preprocessing, "_preprocess_one", real)
    assert main(PREPROCESS) == 0  # the printed command resumes
    assert "unl_071" in read_manifest(str(pre / MANIFEST_2D))["cases"]

    from nnunet_proto.benchmark import runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_benchmark", interrupted)
    bench = ["benchmark", "-d", str(DATASET_ID), "-p", PLANS, "--labeled", "3", "--epochs", "1",
             "--results-dir", str(pre.parent / "bench")]
    assert main(bench) == 130
    err = capsys.readouterr().err
    assert "nnunet_proto benchmark: interrupted; finished runs are kept" in err
    assert "Resume with: nnunet_proto benchmark -d 801" in err


# ---------------------------------------------------------------- smaller things
@pytest.mark.parametrize("content, why", [("{}", "holds a JSON dict; nnU-Net expects a list of folds"),
                                         ('[{"train": ["a"]}]', "fold 0 has no 'val' list"),
                                         ("[{", "is not valid JSON")])
def test_make_splits_names_a_malformed_splits_file(content, why, copied, capsys):
    _, pre = copied
    (pre / "splits_final.json").write_text(content)
    assert main(["make-splits", "-d", str(DATASET_ID), "--labeled", "3"]) == 2
    err = capsys.readouterr().err
    assert f"{pre / 'splits_final.json'}" in err and why in err
    assert (pre / "splits_final.json").read_text() == content


@pytest.mark.parametrize("args, flag", [(["make-splits", "-d", "1", "--labeled", "3", "--seed", "-1"], "--seed"),
                                        (["synthetic", "-d", "970", "--seed", "-1"], "--seed"),
                                        (["synthetic", "-d", "970", "--unlabeled", "-1"], "--unlabeled"),
                                        (["synthetic", "-d", "970", "--test", "-2"], "--test"),
                                        (["convert-acdc", "in", "-d", "970", "--test-count", "-1"], "--test-count")])
def test_negative_seeds_and_counts_name_the_flag(args, flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["-o", str(tmp_path)] if args[0] != "make-splits" else args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: expected a non-negative integer, got -" in err
    assert not any(tmp_path.iterdir())


def test_a_second_folder_with_the_same_dataset_id_is_refused(tmp_path, capsys):
    existing = tmp_path / "Dataset971_Mine"
    existing.mkdir()
    (existing / "dataset.json").write_text("{}")
    before = checksums(existing)
    assert main(["synthetic", "-d", "971", "--labeled", "2", "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{existing} already has the dataset id 971" in err and "ambiguous" in err
    assert main(["convert-acdc", str(tmp_path / "h5"), "-d", "971", "-o", str(tmp_path), "--overwrite"]) == 2
    assert f"{existing} already has the dataset id 971" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset971_Mine"] and checksums(existing) == before

"""Offline self-training (issue 22): ``nnunet_proto pseudo-label``, nnUNetTrainerSelfTraining and ``self-train``.

A teacher (plain ``nnUNetTrainer_smoke``) is trained once per module on the synthetic fold through nnU-Net's
trainer API; every test works on private copies of the raw and preprocessed dataset and of the teacher's results
folder, so images can be changed, the teacher retrained and sets remade without touching the session dataset.
"""
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import DATASET_ID, NNUNET_ENV, PLANS, build_trainer, run_cli

from nnunet_proto.cli import main
from nnunet_proto.data.image_check import image_content_hash
from nnunet_proto.data.pseudo_labels import (
    PSEUDO_LABELS_ENV,
    PseudoLabelError,
    SetKey,
    Teacher,
    confidence_stats,
    least_confident,
    make_pseudo_labels,
    manifest_digest,
    open_set,
    ranking,
    set_folder,
)
from nnunet_proto.training.self_training import (
    CHECKPOINT_KEY,
    PSEUDO_PREFIX,
    SelfTrainingConfig,
    labeled_count,
    student_classes,
)

TEACHER = "nnUNetTrainer_smoke"
STUDENT = "nnUNetTrainerSelfTraining"
UNLABELED_FOLDER = ["unl_000", "unl_001", "unl_002"]
BIN = Path(sys.executable).parent


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def teacher_results(synthetic_dataset, tmp_path_factory) -> Path:
    """nnUNet_results holding a finished nnUNetTrainer_smoke run of the synthetic fold (checkpoint_final.pth)."""
    results = tmp_path_factory.mktemp("teacher") / "results"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("nnUNet_results", str(results))
        mp.setenv("nnUNet_n_proc_DA", "0")
        torch.manual_seed(0)
        np.random.seed(0)
        trainer = build_trainer(TEACHER, synthetic_dataset)
        trainer.run_training()  # nnU-Net's training loop; writes checkpoint_final.pth (no final validation needed)
    assert (Path(trainer.output_folder) / "checkpoint_final.pth").is_file()
    return results


@dataclasses.dataclass
class Workspace:
    ds: object  # conftest.SyntheticDataset pointing at the private copies
    raw: Path
    pre: Path
    results: Path

    @property
    def fold(self) -> int:
        return self.ds.fold

    @property
    def key(self) -> SetKey:
        return SetKey(self.ds.name, PLANS, "2d", self.fold, 1)

    @property
    def folder(self) -> Path:
        return set_folder(self.key)

    def teacher(self, trainer: str = TEACHER) -> Teacher:
        return Teacher(trainer, PLANS, "2d", self.fold)

    def teacher_checkpoint(self) -> Path:
        return self.teacher().checkpoint_path(self.ds.name)

    def manifest(self, folder: Path = None) -> dict:
        return json.loads(((folder or self.folder) / "manifest.json").read_text())

    def fold_dict(self) -> dict:
        return json.loads((self.pre / "splits_final.json").read_text())[self.fold]

    def expected_pool(self) -> set:
        return set(self.fold_dict()["unlabeled"]) | set(UNLABELED_FOLDER)

    def open(self, **kw):
        from nnunet_proto.training.unlabeled import preprocessing_fingerprint

        fingerprint = preprocessing_fingerprint(self.ds.load_plans(), "2d", self.ds.dataset_json())
        return open_set(self.key, fingerprint, self.raw, **kw)

    def image(self, case: str) -> Path:
        sub = "imagesUnlabeled" if case.startswith("unl_") else "imagesTr"
        return self.raw / sub / f"{case}_0000.nii.gz"


@pytest.fixture
def ws(synthetic_dataset, teacher_results, tmp_path, monkeypatch) -> Workspace:
    """Private raw, preprocessed and results folders (the teacher run copied); sets in the default location."""
    ds = synthetic_dataset
    raw, pre, results = tmp_path / "raw" / ds.name, tmp_path / "pre" / ds.name, tmp_path / "results"
    shutil.copytree(ds.raw, raw)  # copy2: the mtimes stay, as for an untouched dataset
    shutil.copytree(ds.preprocessed, pre, ignore=shutil.ignore_patterns("pseudo_labels"))
    shutil.copytree(teacher_results, results)
    monkeypatch.setenv("nnUNet_raw", str(raw.parent))
    monkeypatch.setenv("nnUNet_preprocessed", str(pre.parent))
    monkeypatch.setenv("nnUNet_results", str(results))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    monkeypatch.delenv(PSEUDO_LABELS_ENV, raising=False)
    # pseudo-label and self-train set nnUNet_extTrainer for nnU-Net's lookup: restore it after the test
    monkeypatch.setenv("nnUNet_extTrainer", NNUNET_ENV["nnUNet_extTrainer"])
    torch.manual_seed(0)
    np.random.seed(0)
    return Workspace(dataclasses.replace(ds, raw=raw, preprocessed=pre), raw, pre, results)


def pseudo_label(ws: Workspace, *extra: str, trainer: str = TEACHER) -> str:
    return run_cli("pseudo-label", "-d", str(DATASET_ID), "-c", "2d", "-p", PLANS, "-f", str(ws.fold), "-tr", trainer,
                   "-device", "cpu", *extra)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def checksums(root: Path) -> dict:
    return {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def change_voxels(path: Path) -> None:
    """Rewrite an image with some voxels changed (same geometry, same file name)."""
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)
    arr[..., :10, :10] = arr.max() + 1
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    sitk.WriteImage(out, str(path))


def retrain(checkpoint: Path) -> None:
    """Another teacher at the same place: the checkpoint's weights changed (as after training it again)."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    g = torch.Generator().manual_seed(1)
    ckpt["network_weights"] = {k: v + 0.3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                               for k, v in ckpt["network_weights"].items()}
    torch.save(ckpt, checkpoint)


def subprocess_env() -> dict:
    env = {**os.environ, **NNUNET_ENV, "OMP_NUM_THREADS": "1", "nnUNet_n_proc_DA": "1"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


# ---------------------------------------------------------------------------------------------- 1. the set
def test_pseudo_label_writes_a_complete_manifest(ws):
    out = pseudo_label(ws)
    pool = ws.expected_pool()
    assert len(pool) == 8 and f"8 pseudo labels (8 predicted now) in {ws.folder}" in out
    assert ws.folder == ws.pre / "pseudo_labels" / f"{PLANS}__2d__fold_{ws.fold}__round_1"  # beside, not in, the GT

    m = ws.manifest()
    assert m["complete"] is True and set(m["cases"]) == pool
    ckpt = ws.teacher_checkpoint()
    t = m["teacher"]
    assert t["trainer"] == TEACHER and t["fold"] == ws.fold and t["use_mirroring"] is True
    assert t["checkpoint_path"] == str(ckpt) and t["checkpoint_sha256"] == sha256(ckpt)
    assert m["data_identifier"] == "nnUNetPlans_2d"
    split = set(ws.fold_dict()["unlabeled"])
    for case, v in m["cases"].items():
        assert v["source"] == ("split" if case in split else "imagesUnlabeled"), case
        assert [r["name"] for r in v["images"]] == [ws.image(case).name]
        assert v["images"][0]["sha256"] == image_content_hash(str(ws.image(case)))
        label = ws.folder / v["label"]
        assert v["label"] == f"labels/{case}.nii.gz" and v["label_sha256"] == sha256(label)
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(label)))
        assert seg.shape == sitk.GetArrayFromImage(sitk.ReadImage(str(ws.image(case)))).shape
        assert set(np.unique(seg)) <= {0, 1, 2, 3}
        assert 0.0 <= v["confidence"] <= 1.0 and 0.0 <= v["entropy"] <= 1.0
        for suffix in (".b2nd", "_seg.b2nd", ".pkl"):  # preprocessed with the label, as nnU-Net does labelsTr
            assert (ws.folder / "nnUNetPlans_2d" / f"{case}{suffix}").is_file(), (case, suffix)
    assert sorted(p.name for p in (ws.folder / "labels").iterdir()) == sorted(f"{c}.nii.gz" for c in pool)
    conf = [m["cases"][c]["confidence"] for c in m["ranking"]]
    assert sorted(m["ranking"]) == sorted(pool) and conf == sorted(conf, reverse=True)
    assert m["dropped"] == [] and m["drop_least_confident"] == 0.0
    assert m["digest"] == manifest_digest(m)

    # the label and its confidence are nnU-Net's own prediction of the image (mirroring on, like nnUNetv2_predict)
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    case = m["ranking"][0]
    predictor = nnUNetPredictor(use_mirroring=True, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(ckpt.parent.parent), use_folds=(ws.fold,))
    image, props = SimpleITKIO().read_images([str(ws.image(case))])
    seg, probs = predictor.predict_single_npy_array(image, props, None, None, True)
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(ws.folder / "labels" / f"{case}.nii.gz")))
    assert np.array_equal(label, seg)
    stats = confidence_stats(probs, seg)
    for k in ("confidence", "entropy", "foreground_fraction"):
        assert m["cases"][case][k] == pytest.approx(stats[k], abs=1e-4), k

    opened = ws.open()
    assert opened.cases == sorted(pool) and opened.digest == m["digest"]
    assert pseudo_label(ws).startswith("8 pseudo labels (0 predicted now)")  # a finished set is not redone
    assert ws.manifest()["digest"] == m["digest"]


# ---------------------------------------------------------------------------------------------- 2. changed images
def test_changed_image_is_refused_by_name_and_predicted_again(ws, capsys):
    pseudo_label(ws)
    before = ws.manifest()
    student = build_trainer(STUDENT, ws.ds)

    os.utime(ws.image("case_001"))  # touched, same voxels: not a change
    assert student.open_pseudo_labels().digest == before["digest"]

    change_voxels(ws.image("unl_001"))
    with pytest.raises(PseudoLabelError, match=r"'unl_001'.*changed since its label was made"):
        student.open_pseudo_labels()  # what the student runs at the start of training
    out = pseudo_label(ws)
    assert "8 pseudo labels (1 predicted now, 1 redone)" in out
    after = ws.manifest()
    assert after["complete"] and after["cases"]["unl_001"]["images"][0]["sha256"] == \
        image_content_hash(str(ws.image("unl_001"))) != before["cases"]["unl_001"]["images"][0]["sha256"]
    for case in set(before["cases"]) - {"unl_001"}:  # the others were kept, not predicted again
        assert after["cases"][case] == before["cases"][case], case
    assert ws.open().cases == sorted(ws.expected_pool())

    ws.image("unl_002").unlink()  # a vanished image: refused, then the set follows the pool
    with pytest.raises(PseudoLabelError, match=r"'unl_002'.*vanished"):
        ws.open()
    assert "7 pseudo labels (0 predicted now, 1 vanished)" in pseudo_label(ws)
    assert "unl_002" not in ws.manifest()["cases"] and not (ws.folder / "labels" / "unl_002.nii.gz").exists()
    assert not (ws.folder / "nnUNetPlans_2d" / "unl_002.b2nd").exists()


# ---------------------------------------------------------------------------------------------- 3. another teacher
def test_another_teacher_is_refused_by_name_unless_overwrite(ws):
    pseudo_label(ws)
    before = ws.manifest()
    ckpt = ws.teacher_checkpoint()
    retrain(ckpt)
    assert sha256(ckpt) != before["teacher"]["checkpoint_sha256"]

    with pytest.raises(PseudoLabelError, match=r"teacher checkpoint .* changed since .* stale.*--overwrite"):
        ws.open()  # the student refuses labels of a teacher that is no longer there
    listing = checksums(ws.folder)
    with pytest.raises(PseudoLabelError) as err:
        make_pseudo_labels(str(DATASET_ID), ws.teacher(), verbose=False)
    msg = str(err.value)
    assert "another teacher" in msg and TEACHER in msg and str(ckpt) in msg and "checkpoint_sha256" in msg
    assert "stale" in msg and "--overwrite" in msg
    assert checksums(ws.folder) == listing  # refused before anything was written

    assert main(["pseudo-label", "-d", str(DATASET_ID), "-c", "2d", "-p", PLANS, "-f", str(ws.fold), "-tr", TEACHER,
                 "-device", "cpu"]) == 2
    assert "8 pseudo labels (8 predicted now)" in pseudo_label(ws, "--overwrite")
    after = ws.manifest()
    assert after["complete"] and after["teacher"]["checkpoint_sha256"] == sha256(ckpt)
    assert after["digest"] != before["digest"] and after["digest"] == manifest_digest(after)
    assert ws.open().digest == after["digest"]

    # the same teacher without mirroring is another teacher too (other labels)
    with pytest.raises(PseudoLabelError, match=r"use_mirroring: set True vs now False"):
        make_pseudo_labels(str(DATASET_ID), dataclasses.replace(ws.teacher(), use_mirroring=False), verbose=False)


# ---------------------------------------------------------------------------------------------- 4. no leaks
def test_validation_and_test_cases_never_enter_the_set(ws):
    pseudo_label(ws)
    fold = ws.fold_dict()
    cases = set(ws.manifest()["cases"])
    test_ids = {p.name[: -len("_0000.nii.gz")] for p in (ws.raw / "imagesTs").iterdir()}
    assert test_ids == {"test_000", "test_001"}
    assert cases == ws.expected_pool()
    assert not cases & (set(fold["train"]) | set(fold["val"]) | test_ids)

    listing = checksums(ws.folder)
    unlabeled = ws.raw / "imagesUnlabeled"
    val_case = fold["val"][0]
    copies = [(ws.raw / "imagesTr" / f"{val_case}_0000.nii.gz", "unl_900", f"validation case {val_case}"),
              (ws.raw / "imagesTs" / "test_000_0000.nii.gz", "unl_901", "test image test_000_0000.nii.gz")]
    for source, name, why in copies:
        shutil.copy(source, unlabeled / f"{name}_0000.nii.gz")
        with pytest.raises(PseudoLabelError) as err:
            make_pseudo_labels(str(DATASET_ID), ws.teacher(), verbose=False)
        assert f"{name}: identical voxels to {why}" in str(err.value) and "Nothing was written" in str(err.value)
        (unlabeled / f"{name}_0000.nii.gz").unlink()
        assert checksums(ws.folder) == listing

    shutil.copy(ws.raw / "imagesTs" / "test_001_0000.nii.gz", unlabeled / "test_001_0000.nii.gz")  # a test id
    with pytest.raises(ValueError, match="test_001"):
        make_pseudo_labels(str(DATASET_ID), ws.teacher(), verbose=False)
    (unlabeled / "test_001_0000.nii.gz").unlink()
    assert checksums(ws.folder) == listing

    # a pool image that became a test image after the set was made: the student refuses the set
    shutil.copy(ws.image("unl_000"), ws.raw / "imagesTs" / "test_777_0000.nii.gz")
    with pytest.raises(PseudoLabelError, match=r"\['unl_000'\].*test cases"):
        ws.open()


# ---------------------------------------------------------------------------------------------- 5. resume
def test_interrupted_run_resumes_where_it_stopped(ws, monkeypatch):
    from nnunet_proto.training import compat

    calls = []
    fail_after = [3]

    class CountingPredictor(compat.nnUNetPredictor):
        # the sliding-window step every prediction path of nnUNetPredictor goes through, once per case
        def predict_logits_from_preprocessed_data(self, *args, **kwargs):
            if fail_after[0] is not None and len(calls) >= fail_after[0]:
                raise KeyboardInterrupt  # Ctrl-C while predicting the fourth case
            calls.append(1)
            return super().predict_logits_from_preprocessed_data(*args, **kwargs)

    monkeypatch.setattr(compat, "nnUNetPredictor", CountingPredictor)
    argv = ["pseudo-label", "-d", str(DATASET_ID), "-c", "2d", "-p", PLANS, "-f", str(ws.fold), "-tr", TEACHER,
            "-device", "cpu"]
    assert main(argv) == 130
    m = ws.manifest()
    assert len(m["cases"]) == 3 and m["complete"] is False and "digest" not in m
    done = {c: (ws.folder / m["cases"][c]["label"]).stat().st_mtime_ns for c in m["cases"]}
    with pytest.raises(PseudoLabelError, match="incomplete"):
        ws.open()

    calls.clear()
    fail_after[0] = None
    assert "8 pseudo labels (5 predicted now)" in run_cli(*argv)
    assert len(calls) == 5
    m2 = ws.manifest()
    assert m2["complete"] is True and set(m2["cases"]) == ws.expected_pool()
    for case, mtime in done.items():  # the first three were not predicted again
        assert m2["cases"][case] == m["cases"][case] and (ws.folder / m2["cases"][case]["label"]).stat().st_mtime_ns \
            == mtime
    assert not list((ws.folder / "labels").glob(".partial_*"))
    assert ws.open().cases == sorted(ws.expected_pool())


# ---------------------------------------------------------------------------------------------- 6. confidence
def _probs(fg_prob: float, shape=(4, 4)) -> np.ndarray:
    """(3, *shape) softmax maps: class 1 with ``fg_prob``, the rest split evenly."""
    rest = (1.0 - fg_prob) / 2
    p = np.full((3, *shape), rest, dtype=np.float32)
    p[1] = fg_prob
    return p


def test_confidence_ranking_and_least_confident():
    seg = np.zeros((4, 4), dtype=np.uint8)
    seg[1:3, 1:3] = 1
    sure = confidence_stats(_probs(0.96), seg)
    unsure = confidence_stats(_probs(0.4), seg)
    assert sure["confidence"] == pytest.approx(0.96) and unsure["confidence"] == pytest.approx(0.4)
    assert sure["entropy"] < unsure["entropy"] <= 1.0 and sure["foreground_fraction"] == pytest.approx(4 / 16)
    uniform = confidence_stats(np.full((3, 4, 4), 1 / 3, dtype=np.float32), seg)
    assert uniform["entropy"] == pytest.approx(1.0, abs=1e-5)
    # only the predicted foreground counts: a confident background does not make a label confident
    bg_sure = _probs(0.4)
    bg_sure[:, 0, 0] = [1.0, 0.0, 0.0]
    assert confidence_stats(bg_sure, seg)["confidence"] == pytest.approx(0.4)
    empty = confidence_stats(_probs(0.99), np.zeros((4, 4)))
    assert empty == {"confidence": 0.0, "entropy": 1.0, "foreground_fraction": 0.0}
    with pytest.raises(ValueError, match="disagree in shape"):
        confidence_stats(_probs(0.9), np.zeros((4, 5)))

    cases = {"unsure": unsure, "sure": sure, "empty": empty}
    assert ranking(cases) == ["sure", "unsure", "empty"]
    tie = {"b": {"confidence": 0.5, "entropy": 0.2}, "a": {"confidence": 0.5, "entropy": 0.2},
           "c": {"confidence": 0.5, "entropy": 0.1}}
    assert ranking(tie) == ["c", "a", "b"]

    assert least_confident(cases, 0.0) == []
    assert least_confident(cases, 0.34) == ["empty"]
    assert least_confident(cases, 0.67) == ["unsure", "empty"]
    assert least_confident(cases, 0.99) == ["unsure", "empty"]  # at least one case is always kept
    assert least_confident({"only": sure}, 0.9) == []
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            least_confident(cases, bad)


def test_labeled_count_and_config_edges():
    assert labeled_count(1, 0.5) is None  # a batch of one: the loader draws the kind per batch
    assert labeled_count(2, 0.5) == 1
    assert labeled_count(2, 0.1) == 1 and labeled_count(2, 0.9) == 1  # at least one of each kind
    assert labeled_count(8, 0.5) == 4 and labeled_count(8, 0.25) == 2 and labeled_count(8, 0.75) == 6
    assert labeled_count(4, 0.01) == 1 and labeled_count(4, 0.99) == 3
    for b in range(2, 20):
        for share in (0.01, 0.25, 0.5, 0.75, 0.99):
            assert 1 <= labeled_count(b, share) <= b - 1
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="labeled_share"):
            SelfTrainingConfig(labeled_share=bad)
    with pytest.raises(ValueError, match="drop_least_confident"):
        SelfTrainingConfig(drop_least_confident=1.0)
    with pytest.raises(ValueError, match="round"):
        SelfTrainingConfig(round=0)
    classes = student_classes(STUDENT, __name__)
    assert classes[f"{STUDENT}_share25"].config.labeled_share == 0.25
    assert classes[f"{STUDENT}_round2"].config.round == 2 and classes[f"{STUDENT}_noisy"].config.strong_augmentation
    assert not classes[f"{STUDENT}_scratch"].config.init_from_teacher
    assert classes[f"{STUDENT}_round2"].config.init_from_teacher
    assert all("__" not in name for name in classes)  # nnU-Net splits result folders on "__"


# ---------------------------------------------------------------------------------------------- 7. train + predict
def test_student_trains_and_predicts_through_nnunet_commands(ws, tmp_path, monkeypatch):
    monkeypatch.setenv(PSEUDO_LABELS_ENV, str(tmp_path / "sets"))  # the trainer process must follow it too
    pseudo_label(ws)
    assert ws.folder == tmp_path / "sets" / ws.ds.name / ws.key.name
    digest = ws.manifest()["digest"]
    trainer = f"{STUDENT}_smoke"
    env = subprocess_env()
    train = subprocess.run(["nnUNetv2_train", str(DATASET_ID), "2d", str(ws.fold), "-tr", trainer, "-p", PLANS,
                            "-device", "cpu"], env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    fold_dir = ws.results / ws.ds.name / f"{trainer}__{PLANS}__2d" / f"fold_{ws.fold}"
    assert (fold_dir / "validation" / "summary.json").is_file()
    config = json.loads((fold_dir / "nnunet_proto_config.json").read_text())
    assert config["pseudo_labels"]["folder"] == str(ws.folder) and config["pseudo_labels"]["digest"] == digest
    assert config["pseudo_labels"]["teacher"]["trainer"] == TEACHER and config["pseudo_labels"]["cases"] == 8
    assert config["batch"] == {"size": 2, "labeled": 1}
    ckpt = torch.load(fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt[CHECKPOINT_KEY]["pseudo_labels_digest"] == digest
    plain = build_trainer("nnUNetTrainer", ws.ds)
    plain.initialize()
    plain.network.load_state_dict(ckpt["network_weights"])  # a stock nnU-Net network

    out = tmp_path / "pred"
    pred = subprocess.run(["nnUNetv2_predict", "-i", str(ws.raw / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID),
                           "-c", "2d", "-p", PLANS, "-f", str(ws.fold), "-tr", trainer, "--disable_tta", "-device",
                           "cpu", "-npp", "1", "-nps", "1"], env=env, capture_output=True, text=True, timeout=600)
    assert pred.returncode == 0, pred.stdout[-3000:] + pred.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["test_000.nii.gz", "test_001.nii.gz"]
    for p in out.glob("*.nii.gz"):
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(ws.raw / "labelsTs" / p.name)))
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
        assert seg.shape == ref.shape and set(np.unique(seg)) <= {0, 1, 2, 3}


def test_default_student_starts_from_the_teacher_and_scratch_does_not(ws):
    """The default (chosen on validation) loads the teacher's whole network, segmentation heads included, before
    the first step; ``_scratch`` keeps nnU-Net's random initialisation."""
    pseudo_label(ws)
    teacher = torch.load(ws.teacher_checkpoint(), map_location="cpu", weights_only=False)["network_weights"]
    assert student_classes(STUDENT, __name__)[STUDENT].config.init_from_teacher
    for name, from_teacher in ((STUDENT, True), (f"{STUDENT}_scratch", False)):
        trainer = build_trainer(name, ws.ds)
        trainer.num_epochs, trainer.num_iterations_per_epoch = 1, 1
        trainer.on_train_start()
        try:
            weights = trainer.network.state_dict()
            heads = [k for k in teacher if ".seg_layers." in k]
            assert heads  # the heads, which nnU-Net's -pretrained_weights would not transfer
            same = all(torch.equal(weights[k].cpu(), teacher[k]) for k in teacher)
            assert same is from_teacher, name
            if from_teacher:
                assert "student initialised from the teacher's weights" in open(trainer.log_file).read()
        finally:
            trainer.on_train_end()


# ---------------------------------------------------------------------------------------------- 8. batch shares
@pytest.mark.parametrize("variant,batch_size,labeled", [("", 8, 4), ("_share25", 8, 2), ("_share75", 8, 6),
                                                        ("", 2, 1), ("_drop25", 8, 4), ("_noisy", 8, 4)])
def test_labeled_share_of_each_batch(variant, batch_size, labeled, ws):
    pseudo_label(ws)
    plans = ws.ds.load_plans()
    plans["configurations"]["2d"]["batch_size"] = batch_size
    trainer = build_trainer(STUDENT + variant, ws.ds, plans=plans)
    assert labeled_count(batch_size, trainer.config.labeled_share) == labeled
    trainer.initialize()
    gen_tr, _ = trainer.get_dataloaders()
    fold = ws.fold_dict()
    pseudo_cases = set(trainer.pseudo_set.cases)
    m = ws.manifest()
    if variant == "_drop25":  # the two least confident of the eight are left out
        assert trainer.pseudo_set.dropped == m["ranking"][-2:] and len(pseudo_cases) == 6
    else:
        assert pseudo_cases == set(m["cases"])
    for _ in range(6):
        batch = next(gen_tr)
        keys = list(batch["keys"])
        pseudo = [k for k in keys if k.startswith(PSEUDO_PREFIX)]
        assert len(keys) == batch_size == batch["data"].shape[0]
        assert len(keys) - len(pseudo) == labeled
        assert keys[len(pseudo):] == [k for k in keys if not k.startswith(PSEUDO_PREFIX)]  # labeled last
        assert set(keys[len(pseudo):]) <= set(fold["train"])  # never a validation or unlabeled-split label
        assert {k[len(PSEUDO_PREFIX):] for k in pseudo} <= pseudo_cases


def test_batch_of_one_is_labeled_with_the_share_probability(ws):
    pseudo_label(ws)
    plans = ws.ds.load_plans()
    plans["configurations"]["2d"]["batch_size"] = 1
    trainer = build_trainer(f"{STUDENT}_share25", ws.ds, plans=plans)
    trainer.initialize()
    gen_tr, _ = trainer.get_dataloaders()
    loader = gen_tr.data_loader
    np.random.seed(0)
    draws = [loader.get_indices() for _ in range(2000)]
    assert all(len(d) == 1 for d in draws)
    share = np.mean([not d[0].startswith(PSEUDO_PREFIX) for d in draws])
    assert share == pytest.approx(0.25, abs=0.04)


# ---------------------------------------------------------------------------------------------- 9. resume refusal
def test_resume_on_other_pseudo_labels_is_refused(ws, tmp_path):
    pseudo_label(ws)
    digest = ws.manifest()["digest"]
    trainer = build_trainer(STUDENT, ws.ds)
    trainer.initialize()
    trainer.pseudo_set = trainer.open_pseudo_labels()
    ckpt = tmp_path / "checkpoint_latest.pth"
    trainer.save_checkpoint(str(ckpt))
    assert torch.load(ckpt, map_location="cpu", weights_only=False)[CHECKPOINT_KEY]["pseudo_labels_digest"] == digest

    same = build_trainer(STUDENT, ws.ds, continue_training=True)
    same.load_checkpoint(str(ckpt))  # same set, same config: resumes
    assert same.current_epoch == 1
    with pytest.raises(ValueError, match=r"config.labeled_share: checkpoint 0.5 vs now 0.25"):
        build_trainer(f"{STUDENT}_share25", ws.ds, continue_training=True).load_checkpoint(str(ckpt))

    # the same labels, but the set now leaves its two least confident cases out: the default student (which takes
    # the set's share) would continue on other cases than it started with
    assert "(0 predicted now)" in pseudo_label(ws, "--drop-least-confident", "0.25")
    assert len(ws.open().cases) == 6
    with pytest.raises(ValueError, match=r"pseudo-labeled cases: checkpoint trained on 8, now 6"):
        build_trainer(STUDENT, ws.ds, continue_training=True).load_checkpoint(str(ckpt))
    pseudo_label(ws)  # back to every case: resumes again
    build_trainer(STUDENT, ws.ds, continue_training=True).load_checkpoint(str(ckpt))

    retrain(ws.teacher_checkpoint())
    pseudo_label(ws, "--overwrite")
    new_digest = ws.manifest()["digest"]
    assert new_digest != digest
    other = build_trainer(STUDENT, ws.ds, continue_training=True)
    with pytest.raises(ValueError) as err:
        other.load_checkpoint(str(ckpt))
    msg = str(err.value)
    assert "pseudo labels" in msg and digest in msg and new_digest in msg and str(ckpt) in msg


# ---------------------------------------------------------------------------------------------- 10. rounds
def test_self_train_two_rounds_and_skip_finished(ws, capsys):
    argv = ["self-train", "-d", str(DATASET_ID), "-c", "2d", "-p", PLANS, "-f", str(ws.fold), "-tr", TEACHER,
            "--rounds", "2", "--student", f"{STUDENT}_smoke", "-device", "cpu"]
    out = run_cli(*argv)
    round2 = f"{STUDENT}_round2_smoke"
    assert f"final student: {round2}" in out
    model = {r: ws.results / ws.ds.name / f"{name}__{PLANS}__2d" / f"fold_{ws.fold}"
             for r, name in ((1, f"{STUDENT}_smoke"), (2, round2))}
    sets = {r: set_folder(dataclasses.replace(ws.key, round=r)) for r in (1, 2)}
    for r in (1, 2):
        for f in ("checkpoint_final.pth", "validation/summary.json", "validation/postprocessing.pkl"):
            assert (model[r] / f).is_file(), (r, f)
        m = ws.manifest(sets[r])
        assert m["complete"] and m["round"] == r
        ckpt = torch.load(model[r] / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        assert ckpt[CHECKPOINT_KEY]["config"]["round"] == r
        assert ckpt[CHECKPOINT_KEY]["pseudo_labels_digest"] == m["digest"]
    t1, t2 = ws.manifest(sets[1])["teacher"], ws.manifest(sets[2])["teacher"]
    assert t1["trainer"] == TEACHER and t1["checkpoint_path"] == str(ws.teacher_checkpoint())
    # round 2's teacher is the round-1 student, with the postprocessing determined on its validation
    assert t2["trainer"] == f"{STUDENT}_smoke" and t2["checkpoint_path"] == str(model[1] / "checkpoint_final.pth")
    assert t2["checkpoint_sha256"] == sha256(model[1] / "checkpoint_final.pth")
    assert t2["postprocessing"]["file"] == str(model[1] / "validation" / "postprocessing.pkl")

    capsys.readouterr()
    stamps = {p: p.stat().st_mtime_ns for r in (1, 2) for p in (*model[r].rglob("*"), *sets[r].rglob("*"))
              if p.is_file()}
    assert f"final student: {round2}" in run_cli(*argv)
    err = capsys.readouterr().err
    assert err.count("(finished earlier)") == 2
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing was trained or predicted again


# ---------------------------------------------------------------------------------------------- options
def test_postprocessing_none_or_a_given_file_and_skip_bad(ws, capsys):
    """--postprocessing none / FILE are recorded and applied; a broken pool image is refused by name, or skipped
    with --skip-bad."""
    from nnunet_proto.training.compat import apply_postprocessing

    out = pseudo_label(ws, "--postprocessing", "none")
    assert ws.manifest()["teacher"]["postprocessing"]["steps"] == [] and "8 pseudo labels" in out
    # nnU-Net's own step: keep only the largest component of class 1 (pickled as nnU-Net writes it)
    import pickle

    from nnunetv2.postprocessing.remove_connected_components import remove_all_but_largest_component_from_segmentation

    pkl = ws.pre.parent / "pp.pkl"
    pkl.write_bytes(pickle.dumps(([remove_all_but_largest_component_from_segmentation], [{"labels_or_regions": 1}])))
    assert main(["pseudo-label", "-d", str(DATASET_ID), "-c", "2d", "-p", PLANS, "-f", str(ws.fold), "-tr", TEACHER,
                 "-device", "cpu", "--postprocessing", str(pkl)]) == 2  # another postprocessing: a stale set
    assert "postprocessing_sha256" in capsys.readouterr().err
    pseudo_label(ws, "--postprocessing", str(pkl), "--overwrite")
    m = ws.manifest()
    assert [s["function"] for s in m["teacher"]["postprocessing"]["steps"]] == [
        "remove_all_but_largest_component_from_segmentation"]
    for case, v in m["cases"].items():  # every label is its own postprocessing's fixed point
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(ws.folder / v["label"])))
        again = apply_postprocessing(seg.copy(), [remove_all_but_largest_component_from_segmentation],
                                     [{"labels_or_regions": 1}])
        assert np.array_equal(seg, again), case

    # a truncated image in the pool: refused by name, nothing written; --skip-bad leaves it out
    shutil.rmtree(ws.folder)
    broken = ws.image("unl_002")
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    assert main(["pseudo-label", "-d", str(DATASET_ID), "-c", "2d", "-p", PLANS, "-f", str(ws.fold), "-tr", TEACHER,
                 "-device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "unl_002_0000.nii.gz" in err and "--skip-bad" in err and not ws.folder.exists()
    out = pseudo_label(ws, "--skip-bad")
    m = ws.manifest()
    assert "unl_002" not in m["cases"] and "unl_002" in m["skipped"] and len(m["cases"]) == 7 and m["complete"]


def test_region_datasets_and_cascades_are_refused():
    from nnunet_proto.data.pseudo_labels import PseudoLabelError, _check_dataset

    plans = {"plans_name": "p", "configurations": {"2d": {"data_identifier": "x", "preprocessor_name":
                                                           "DefaultPreprocessor", "batch_size": 2,
                                                           "patch_size": [8, 8], "spacing": [1, 1]}}}
    regions = {"labels": {"background": 0, "whole": [1, 2], "core": 2}, "regions_class_order": [1, 2]}
    with pytest.raises(PseudoLabelError, match="region-based"):
        _check_dataset(plans, "2d", regions)
    with pytest.raises(KeyError, match="3d_fullres"):
        _check_dataset(plans, "3d_fullres", {"labels": {"background": 0, "a": 1}})

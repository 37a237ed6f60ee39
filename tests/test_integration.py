"""End to end: synthetic raw dataset -> plan/preprocess -> preprocess-unlabeled + make-splits (session
fixture, through the CLI) -> a few iterations of CPCL (2d) and Mean Teacher (3d_fullres) through nnU-Net's
Python training API -> prediction of the held-out cases with nnU-Net's predictor (student and teacher
checkpoints) -> Dice against labelsTs."""
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_proto.training.progress import PREFIX


def _dice_per_class(ref: np.ndarray, pred: np.ndarray, labels) -> dict:
    out = {}
    for c in labels:
        r, p = ref == c, pred == c
        denom = r.sum() + p.sum()
        out[c] = float(2 * (r & p).sum() / denom) if denom else float("nan")
    return out


def _predict(model_dir: Path, fold: int, images: Path, out: Path, checkpoint: str) -> None:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False, device=torch.device("cpu"),
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=(fold,), checkpoint_name=checkpoint)
    predictor.predict_from_files(str(images), str(out), save_probabilities=False, overwrite=True,
                                 num_processes_preprocessing=1, num_processes_segmentation_export=1)


@pytest.mark.parametrize("trainer_name,configuration", [("nnUNetTrainerCPCL_smoke", "2d"),
                                                        ("nnUNetTrainerMeanTeacher_smoke", "3d_fullres")])
def test_train_predict_evaluate(trainer_name, configuration, synthetic_dataset, fresh_results, tmp_path):
    from nnunetv2.run.run_training import run_training

    ds = synthetic_dataset
    run_training(str(ds.id), configuration, ds.fold, trainer_name, ds.plans, device=torch.device("cpu"))

    model_dir = fresh_results / ds.name / f"{trainer_name}__{ds.plans}__{configuration}"
    fold_dir = model_dir / f"fold_{ds.fold}"
    for f in ("checkpoint_final.pth", "checkpoint_final_teacher.pth", "progress.png", "nnunet_proto_config.json"):
        assert (fold_dir / f).is_file(), f
    assert (fold_dir / "validation" / "summary.json").is_file()  # nnU-Net's own final validation ran

    ckpt = torch.load(fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    logging = ckpt["logging"]
    epochs = len(logging["train_losses"])
    assert epochs == 2
    term_keys = [k for k in logging if k.startswith(PREFIX)]
    assert f"{PREFIX}loss_sup" in term_keys and len(term_keys) >= 5
    for k in term_keys:  # every term logged every epoch
        assert len(logging[k]) == epochs, k
    config = json.loads((fold_dir / "nnunet_proto_config.json").read_text())
    assert config["unlabeled"]["num_cases"] > 0

    labels = [1, 2, 3]
    for checkpoint in ("checkpoint_final.pth", "checkpoint_final_teacher.pth"):
        out = tmp_path / checkpoint.replace(".pth", "")
        _predict(model_dir, ds.fold, ds.raw / "imagesTs", out, checkpoint)
        preds = sorted(out.glob("*.nii.gz"))
        assert [p.name for p in preds] == ["test_000.nii.gz", "test_001.nii.gz"]
        for p in preds:
            ref_img = sitk.ReadImage(str(ds.raw / "labelsTs" / p.name))
            pred_img = sitk.ReadImage(str(p))
            ref, pred = sitk.GetArrayFromImage(ref_img), sitk.GetArrayFromImage(pred_img)
            assert pred.shape == ref.shape and pred_img.GetSpacing() == pytest.approx(ref_img.GetSpacing())
            assert set(np.unique(pred)) <= {0, 1, 2, 3}
            dice = _dice_per_class(ref, pred, labels)
            assert all(np.isnan(d) or 0.0 <= d <= 1.0 for d in dice.values())

"""Each nnU-Net internal that nnunet_proto relies on (training/compat.py) has a test that fails when it changes."""
import inspect

import numpy as np
import pytest
import torch
from conftest import build_trainer

from nnunet_proto.training import compat


def test_nnunet_version_is_the_tested_minor():
    assert compat.nnunet_version().startswith(compat.NNUNET_VERSION_TESTED.rsplit(".", 1)[0])


def test_checkpoint_payload_matches_nnunet_save_checkpoint(synthetic_dataset, fresh_results, tmp_path):
    trainer = build_trainer("nnUNetTrainer", synthetic_dataset, "2d")
    trainer.initialize()
    f = tmp_path / "plain.pth"
    compat.nnUNetTrainer.save_checkpoint(trainer, str(f))
    written = torch.load(f, map_location="cpu", weights_only=False)
    ours = compat.checkpoint_payload(trainer)
    assert set(ours) == set(written)
    assert ours["current_epoch"] == written["current_epoch"]
    assert ours["trainer_name"] == written["trainer_name"]
    assert set(ours["network_weights"]) == set(written["network_weights"])


def test_local_logger_keys_and_single_value_per_epoch():
    logger = compat.LocalLogger()
    assert set(logger.my_fantastic_logging) == {"mean_fg_dice", "ema_fg_dice", "dice_per_class_or_region",
                                                 "train_losses", "val_losses", "lrs", "epoch_start_timestamps",
                                                 "epoch_end_timestamps"}
    with pytest.raises(AssertionError):
        logger.log("not_registered", 1.0, 0)


def test_data_loader_signature():
    params = list(inspect.signature(compat.nnUNetDataLoader.__init__).parameters)
    assert params[:6] == ["self", "data", "batch_size", "patch_size", "final_patch_size", "label_manager"]
    for p in ("oversample_foreground_percent", "sampling_probabilities", "pad_sides", "probabilistic_oversampling",
              "transforms"):
        assert p in params


def test_network_has_decoder_stages_and_deep_supervision_flag(synthetic_dataset):
    from nnunet_proto.training.feature_tap import FeatureTap, layer_channels

    plans = compat.PlansManager(synthetic_dataset.load_plans())
    for configuration in ("2d", "3d_fullres"):
        cm = plans.get_configuration(configuration)
        net = compat.nnUNetTrainer.build_network_architecture(plans, cm, 1, 4, enable_deep_supervision=True)
        assert hasattr(net.decoder, "stages") and hasattr(net.decoder, "deep_supervision")
        taps = {layer: FeatureTap(net, layer) for layer in ("decoder", "decoder-2", "bottleneck", "encoder:1")}
        x = torch.randn(2, 1, *cm.patch_size)
        out = net(x)
        assert isinstance(out, (list, tuple)) and out[0].shape[2:] == x.shape[2:]
        arch = cm.network_arch_init_kwargs
        feats = {layer: tap.pop() for layer, tap in taps.items()}
        for layer, f in feats.items():
            assert f.shape[1] == layer_channels(arch, layer), layer
        assert feats["decoder"].shape[2:] == tuple(cm.patch_size)  # last decoder stage: full resolution
        assert feats["decoder"].requires_grad  # hooks keep the graph
        with pytest.raises(RuntimeError, match="no output"):
            taps["decoder"].pop()  # popped features are never reused


def test_run_case_without_label_returns_crop_mask(synthetic_dataset):
    plans = compat.PlansManager(synthetic_dataset.load_plans())
    cm = plans.get_configuration("2d")
    image = sorted((synthetic_dataset.raw / "imagesTs").glob("*.nii.gz"))[0]
    data, seg, props = cm.preprocessor_class(verbose=False).run_case([str(image)], None, plans, cm,
                                                                     synthetic_dataset.dataset_json())
    assert data.dtype == np.float32 or data.dtype == np.float64
    assert seg.shape[1:] == data.shape[1:]
    assert set(np.unique(seg)) <= {0, -1}
    assert "class_locations" not in props


def test_load_checkpoint_with_dict_is_still_unsupported(synthetic_dataset, fresh_results):
    """nnU-Net 2.8.1 fails on dicts; our trainers refuse them with a clear message instead."""
    trainer = build_trainer("nnUNetTrainerCPCL", synthetic_dataset, "2d")
    with pytest.raises(TypeError, match="file name"):
        trainer.load_checkpoint({})


def test_ext_trainer_lookup_uses_environment(monkeypatch, nnunet_root):
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    with pytest.raises(RuntimeError, match="nnUNet_extTrainer"):
        compat.recursive_find_trainer_class_by_name("nnUNetTrainerCPCL")


def test_postprocessing_functions_signatures():
    """The benchmark calls nnUNetv2_determine_postprocessing's function and applies its result to test predictions;
    it relies on these parameters and on the (functions, kwargs) pair it returns (used in benchmark/run_one.py)."""
    det = list(inspect.signature(compat.determine_postprocessing).parameters)
    assert det == ["folder_predictions", "folder_ref", "plans_file_or_dict", "dataset_json_file_or_dict",
                   "num_processes", "keep_postprocessed_files"]
    app = list(inspect.signature(compat.apply_postprocessing_to_folder).parameters)
    assert app == ["input_folder", "output_folder", "pp_fns", "pp_fn_kwargs", "plans_file_or_dict",
                   "dataset_json_file_or_dict", "num_processes"]


def test_pseudo_dice_history_reads_the_validation_log_nnunet_writes():
    import inspect
    import math
    from types import SimpleNamespace

    # nnU-Net logs the per-class pseudo-Dice of its validation step under this key (MPER's stage switch reads it)
    assert compat.PSEUDO_DICE_KEY in inspect.getsource(compat.nnUNetTrainer.on_validation_epoch_end)
    trainer = SimpleNamespace(logger=compat.LocalLogger())
    assert compat.pseudo_dice_history(trainer) == []
    trainer.logger.log(compat.PSEUDO_DICE_KEY, [0.1, 0.2], 0)
    trainer.logger.log(compat.PSEUDO_DICE_KEY, [0.5, float("nan")], 1)
    history = compat.pseudo_dice_history(trainer)
    assert len(history) == 2 and history[0] == [0.1, 0.2]
    assert history[1][0] == 0.5 and math.isnan(history[1][1])

"""Every nnU-Net internal nnunet_proto relies on, in one place.

This is the only module of the project that imports ``nnunetv2`` (tests/test_layering.py checks
it). Each name re-exported or re-implemented here has a test in tests/test_compat.py that fails
when nnU-Net changes it. Written against nnunetv2 2.8.1.
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgenerators.utilities.file_and_folder_operations import load_json, load_pickle, save_json
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw, nnUNet_results
from nnunetv2.postprocessing.remove_connected_components import (
    apply_postprocessing,
    apply_postprocessing_to_folder,
    determine_postprocessing,
)
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from nnunetv2.run.run_training import get_trainer_from_args, run_training
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import (
    comp_blosc2_params,
    infer_dataset_class,
    nnUNetDatasetBlosc2,
)
from nnunetv2.training.logging.nnunet_logger import LocalLogger
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerDA5 import nnUNetTrainerDA5
from nnunetv2.utilities.crossval_split import generate_crossval_split
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.file_path_utilities import get_output_folder
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP

NNUNET_VERSION_TESTED = "2.8.1"

__all__ = [
    "ConfigurationManager", "DefaultPreprocessor", "LocalLogger", "NNUNET_VERSION_TESTED",
    "NonDetMultiThreadedAugmenter", "PlansManager", "SingleThreadedAugmenter", "apply_postprocessing",
    "apply_postprocessing_to_folder", "get_output_folder", "load_pretrained_weights", "nnUNetTrainerDA5",
    "checkpoint_payload", "comp_blosc2_params", "convert_predicted_logits_to_segmentation_with_correct_shape",
    "determine_postprocessing", "generate_crossval_split",
    "get_allowed_n_proc_DA", "get_pool_and_conv_props",
    "get_trainer_from_args", "run_training", "infer_dataset_class", "pseudo_dice_history", "load_json", "load_pickle",
    "maybe_convert_to_dataset_name", "nnUNetDataLoader", "nnUNetDatasetBlosc2", "nnUNetPredictor",
    "nnUNetTrainer", "nnUNet_preprocessed", "nnUNet_raw", "nnUNet_results", "nnunet_version",
    "recursive_find_trainer_class_by_name", "require_env_path", "save_json", "is_compiled", "unwrap_network",
]


def nnunet_version() -> str:
    from importlib.metadata import version

    return version("nnunetv2")


def unwrap_network(network: torch.nn.Module) -> torch.nn.Module:
    """The plain nnU-Net network inside DDP and torch.compile wrappers (as save_checkpoint does)."""
    mod = network.module if isinstance(network, DDP) else network
    if isinstance(mod, OptimizedModule):
        mod = mod._orig_mod
    return mod


def is_compiled(network: torch.nn.Module) -> bool:
    """Whether ``network`` (inside DDP or not) is wrapped by torch.compile."""
    return isinstance(network.module if isinstance(network, DDP) else network, OptimizedModule)


def checkpoint_payload(trainer: nnUNetTrainer) -> Dict[str, Any]:
    """The checkpoint dict nnUNetTrainer.save_checkpoint (2.8.1) writes, built without writing it.

    We rebuild it instead of calling the base method so that extra keys (teacher, method state)
    go into the same file in one write; tests/test_compat.py asserts the keys equal nnU-Net's.
    """
    return {
        "network_weights": unwrap_network(trainer.network).state_dict(),
        "optimizer_state": trainer.optimizer.state_dict(),
        "grad_scaler_state": trainer.grad_scaler.state_dict() if trainer.grad_scaler is not None else None,
        "logging": trainer.logger.get_checkpoint(),
        "_best_ema": trainer._best_ema,
        "current_epoch": trainer.current_epoch + 1,
        "init_args": trainer.my_init_kwargs,
        "trainer_name": trainer.__class__.__name__,
        "inference_allowed_mirroring_axes": trainer.inference_allowed_mirroring_axes,
    }


#: nnU-Net's logger key of the per-class (or per-region) pseudo-Dice of each epoch's validation step
PSEUDO_DICE_KEY = "dice_per_class_or_region"


def pseudo_dice_history(trainer: nnUNetTrainer) -> List[List[float]]:
    """nnU-Net's per-foreground-class pseudo-Dice of every finished epoch, oldest first ([] before the first).

    nnUNetTrainer.on_validation_epoch_end (2.8.1) logs ``dice_per_class_or_region`` from TP/FP/FN summed
    over the validation patches of every DDP rank, so every rank reads the same values; a class that is
    neither present nor predicted gives NaN. The logger (and this history) is restored by ``--c``.
    """
    history = trainer.logger.get_value(PSEUDO_DICE_KEY, step=None) or []
    return [[float(d) for d in entry] for entry in history]


def require_env_path(var) -> str:
    """Value of an nnU-Net path variable, or a clear error naming the variable to set."""
    if not var.is_set():
        raise RuntimeError(f"Environment variable {var.env_var_name} is not set. nnU-Net and nnunet_proto need "
                           f"nnUNet_raw, nnUNet_preprocessed and nnUNet_results; see nnU-Net's "
                           f"documentation/setting_up_paths.md.")
    return var.get()

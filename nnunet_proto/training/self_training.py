"""Offline self-training (noisy student) on nnU-Net: the student trainer that learns from pseudo-label sets.

A student is plain nnU-Net (network, Dice+CE loss with deep supervision, optimiser, schedule, validation,
checkpoints, predictor) whose training batches hold the fold's labeled cases *and* pseudo-labeled unlabeled
cases (``nnunet_proto pseudo-label``, nnunet_proto/data/pseudo_labels.py), both through nnU-Net's own data
loader and augmentation, at the full weight of nnU-Net's loss:

* every batch has exactly ``round(labeled_share * batch_size)`` labeled patches (at least one of each kind when
  the batch holds two or more; with a batch of one, a labeled patch with probability ``labeled_share``), as in
  the FLARE22 and noisy-student recipes where labeled cases are oversampled;
* the labeled patches sit at the end of the batch, so nnU-Net's forced-foreground slot (the last third of the
  batch) falls on ground truth;
* ``strong_augmentation``: the student trains with nnU-Net's stronger ``nnUNetTrainerDA5`` augmentation (the
  noise of "noisy student"); the teacher's pseudo labels came from un-augmented whole images;
* ``init_from_teacher`` (default, chosen on validation: docs/methods/self_training.md): the student starts from
  the weights of the teacher that labeled its set (the whole network, segmentation heads included); off
  (``_scratch``): from scratch, as in noisy student;
* ``drop_least_confident``: leave out that share of the least confident pseudo labels (None: the set's own
  choice, ``pseudo-label --drop-least-confident``);
* ``round``: round r reads the set of round r (its teacher is usually the student of round r - 1).

At start the set is verified (``pseudo_labels.open_set``): complete, made with these plans, its images and
teacher checkpoint unchanged since, no test case in it. The set's digest and the config go into every
checkpoint; ``--c`` with another set or config is refused.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional

import numpy as np
import torch

from nnunet_proto.data.pseudo_labels import PseudoLabelSet, SetKey, open_set
from nnunet_proto.training.base_trainer import save_checkpoint_with
from nnunet_proto.training.compat import (
    NonDetMultiThreadedAugmenter,
    SingleThreadedAugmenter,
    get_allowed_n_proc_DA,
    infer_dataset_class,
    nnUNetDataLoader,
    nnUNetTrainer,
)
from nnunet_proto.training.precision import CPUAutocastMixin
from nnunet_proto.training.stage_switch import load_every_weight, refuse_stray_warm_start
from nnunet_proto.training.unlabeled import preprocessing_fingerprint

CHECKPOINT_KEY = "nnunet_proto_self_training"
PSEUDO_PREFIX = "pseudo:"


@dataclass(frozen=True)
class SelfTrainingConfig:
    """The student's settings (class attribute of a leaf trainer; variants change it in their name)."""

    labeled_share: float = 0.5
    drop_least_confident: Optional[float] = None
    init_from_teacher: bool = True
    strong_augmentation: bool = False
    round: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.labeled_share < 1.0:
            raise ValueError(f"labeled_share must be in (0, 1) (a share of each batch), got {self.labeled_share}")
        if self.drop_least_confident is not None and not 0.0 <= self.drop_least_confident < 1.0:
            raise ValueError(f"drop_least_confident must be in [0, 1) or None, got {self.drop_least_confident}")
        if self.round < 1:
            raise ValueError(f"round must be >= 1, got {self.round}")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def labeled_count(batch_size: int, share: float) -> Optional[int]:
    """Labeled patches per batch: round(share * batch_size), at least one of each kind when the batch holds two or
    more; None for a batch of one (then the loader draws the kind per batch with probability ``share``)."""
    if batch_size < 2:
        return None
    return min(batch_size - 1, max(1, int(round(share * batch_size))))


class PairedDataset:
    """The labeled and the pseudo-labeled nnU-Net datasets behind one ``load_case`` (pseudo ids prefixed)."""

    def __init__(self, labeled, pseudo):
        self.labeled, self.pseudo = labeled, pseudo
        self.labeled_keys = list(labeled.identifiers)
        self.pseudo_keys = [PSEUDO_PREFIX + i for i in pseudo.identifiers]
        self.identifiers = self.labeled_keys + self.pseudo_keys

    def load_case(self, identifier: str):
        if identifier.startswith(PSEUDO_PREFIX):
            return self.pseudo.load_case(identifier[len(PSEUDO_PREFIX):])
        return self.labeled.load_case(identifier)

    def __getitem__(self, identifier: str):
        return self.load_case(identifier)


class MixedDataLoader(nnUNetDataLoader):
    """nnU-Net's data loader whose batches hold a fixed number of labeled and pseudo-labeled patches.

    Only the choice of cases differs from nnUNetDataLoader (``get_indices``); cropping, foreground oversampling,
    augmentation and deep-supervision targets are nnU-Net's.
    """

    def __init__(self, data: PairedDataset, batch_size: int, patch_size, final_patch_size, label_manager,
                 labeled_share: float, **kwargs):
        super().__init__(data, batch_size, patch_size, final_patch_size, label_manager, **kwargs)
        self.labeled_share = labeled_share
        self.n_labeled = labeled_count(batch_size, labeled_share)

    def get_indices(self) -> List[str]:
        n_l = self.n_labeled if self.n_labeled is not None else int(np.random.uniform() < self.labeled_share)
        pseudo = list(np.random.choice(self._data.pseudo_keys, self.batch_size - n_l, replace=True))
        labeled = list(np.random.choice(self._data.labeled_keys, n_l, replace=True))
        return pseudo + labeled  # labeled last: nnU-Net forces foreground in the last samples of a batch


class SelfTrainingMixin(CPUAutocastMixin):
    """Put before an nnU-Net trainer class in the bases; leaves set ``config``.

    CPU bf16 autocast follows ``NNUNET_PROTO_CPU_PRECISION`` like the semi-supervised trainers.
    """

    config: ClassVar[SelfTrainingConfig] = SelfTrainingConfig()

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.label_manager.has_regions:
            raise ValueError(f"{type(self).__name__} does not support region-based datasets: pseudo labels need one "
                             f"class per voxel. Train with plain nnUNetTrainer or convert the labels to classes.")
        if self.is_cascaded:
            raise ValueError(f"{type(self).__name__} does not support cascade configurations; use 2d, 3d_fullres or "
                             f"3d_lowres")
        self.pseudo_set: Optional[PseudoLabelSet] = None

    # ------------------------------------------------------------------ the pseudo-label set
    @property
    def set_key(self) -> SetKey:
        return SetKey(self.plans_manager.dataset_name, self.plans_manager.plans_name, self.configuration_name,
                      int(self.fold), self.config.round)

    def open_pseudo_labels(self) -> PseudoLabelSet:
        from nnunet_proto.training.compat import nnUNet_raw

        raw = nnUNet_raw.get()
        raw_folder = None if raw is None else Path(raw) / self.plans_manager.dataset_name
        fingerprint = preprocessing_fingerprint(self.plans_manager.plans, self.configuration_name, self.dataset_json)
        return open_set(self.set_key, fingerprint, raw_folder if raw_folder and raw_folder.is_dir() else None,
                        self.config.drop_least_confident)

    def resolved_config(self) -> Dict[str, Any]:
        info = self.pseudo_set.describe() if self.pseudo_set is not None else None
        return {"trainer": type(self).__name__, "method": "self-training", "config": self.config.to_dict(),
                "num_epochs": self.num_epochs, "num_iterations_per_epoch": self.num_iterations_per_epoch,
                "pseudo_labels": info, "batch": {"size": self.batch_size,
                                                 "labeled": labeled_count(self.batch_size, self.config.labeled_share)}}

    # ------------------------------------------------------------------ data
    def get_dataloaders(self):
        if self.pseudo_set is None:
            self.pseudo_set = self.open_pseudo_labels()
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        patch_size = self.configuration_manager.patch_size
        scales = self._get_deep_supervision_scales()
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        lm = self.label_manager
        tr_transforms = self.get_training_transforms(
            patch_size, rotation, scales, mirror_axes, dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=False,
            foreground_labels=lm.foreground_labels, regions=None, ignore_label=lm.ignore_label)
        val_transforms = self.get_validation_transforms(scales, is_cascaded=False,
                                                        foreground_labels=lm.foreground_labels, regions=None,
                                                        ignore_label=lm.ignore_label)
        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        pseudo = infer_dataset_class(str(self.pseudo_set.data_folder))(str(self.pseudo_set.data_folder),
                                                                      list(self.pseudo_set.cases))
        dl_tr = MixedDataLoader(PairedDataset(dataset_tr, pseudo), self.batch_size, initial_patch_size, patch_size,
                                lm, self.config.labeled_share,
                                oversample_foreground_percent=self.oversample_foreground_percent,
                                sampling_probabilities=None, pad_sides=None, transforms=tr_transforms,
                                probabilistic_oversampling=self.probabilistic_oversampling)
        dl_val = nnUNetDataLoader(dataset_val, self.batch_size, patch_size, patch_size, lm,
                                  oversample_foreground_percent=self.oversample_foreground_percent,
                                  sampling_probabilities=None, pad_sides=None, transforms=val_transforms,
                                  probabilistic_oversampling=self.probabilistic_oversampling)
        n = get_allowed_n_proc_DA()
        if n == 0:
            gen_tr, gen_val = SingleThreadedAugmenter(dl_tr, None), SingleThreadedAugmenter(dl_val, None)
        else:
            cuda = self.device.type == "cuda"
            gen_tr = NonDetMultiThreadedAugmenter(dl_tr, None, n, num_cached=max(6, n // 2), seeds=None,
                                                  pin_memory=cuda, wait_time=0.002)
            gen_val = NonDetMultiThreadedAugmenter(dl_val, None, max(1, n // 2), num_cached=max(3, n // 4),
                                                   seeds=None, pin_memory=cuda, wait_time=0.002)
        next(gen_tr)
        next(gen_val)
        return gen_tr, gen_val

    # ------------------------------------------------------------------ start, checkpoints
    def on_train_start(self):
        refuse_stray_warm_start(self)  # the student's warm start is init_from_teacher
        super().on_train_start()  # builds the loaders: the set is opened and verified there
        info = self.pseudo_set.describe()
        n_l = labeled_count(self.batch_size, self.config.labeled_share)
        self.print_to_log_file(
            f"nnunet_proto {type(self).__name__}: {len(self.pseudo_set.cases)} pseudo-labeled cases from "
            f"{info['teacher']['trainer']} (round {self.config.round}, {self.pseudo_set.folder}), "
            f"{len(self.pseudo_set.dropped)} least confident left out (share {self.pseudo_set.drop}); batch "
            + (f"{n_l} labeled + {self.batch_size - n_l} pseudo-labeled" if n_l is not None else
               f"of one, labeled with probability {self.config.labeled_share}")
            + (", nnU-Net DA5 (strong) augmentation" if self.config.strong_augmentation else ""))
        if self.config.init_from_teacher and self.current_epoch == 0:
            ckpt = info["teacher"]["checkpoint_path"]
            load_every_weight(self, ckpt)
            self.print_to_log_file(f"student initialised from the teacher's weights {ckpt}")
        if self.local_rank == 0:
            with open(os.path.join(self.output_folder, "nnunet_proto_config.json"), "w") as f:
                json.dump({**self.resolved_config(), "cpu_precision": self.cpu_precision}, f, indent=2, default=str)

    def save_checkpoint(self, filename: str) -> None:
        save_checkpoint_with(self, filename, CHECKPOINT_KEY, self._checkpoint_state)

    def _checkpoint_state(self) -> Dict[str, Any]:
        st = self.pseudo_set
        return {"config": self.config.to_dict(), "pseudo_labels_digest": st.digest if st else None,
                "pseudo_labels_folder": str(st.folder) if st else None,
                # the digest does not cover the least-confident share the set drops (the default student takes
                # the set's share): record the cases trained on
                "pseudo_labels_cases": list(st.cases) if st else None}

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if not isinstance(filename_or_checkpoint, str):
            raise TypeError("load_checkpoint needs a checkpoint file name (nnU-Net 2.8.1's load_checkpoint fails "
                            "when given a dict)")
        saved = torch.load(filename_or_checkpoint, map_location="cpu", weights_only=False).get(CHECKPOINT_KEY)
        if saved is not None:
            diffs = [f"config.{k}: checkpoint {v!r} vs now {self.config.to_dict().get(k)!r}"
                     for k, v in saved.get("config", {}).items() if self.config.to_dict().get(k) != v]
            if self.pseudo_set is None:
                self.pseudo_set = self.open_pseudo_labels()
            if saved.get("pseudo_labels_digest") != self.pseudo_set.digest:
                diffs.append(f"pseudo labels: checkpoint trained on set {saved.get('pseudo_labels_digest')} "
                             f"({saved.get('pseudo_labels_folder')}), the set is now {self.pseudo_set.digest}")
            elif saved.get("pseudo_labels_cases") is not None and \
                    sorted(saved["pseudo_labels_cases"]) != sorted(self.pseudo_set.cases):
                diffs.append(f"pseudo-labeled cases: checkpoint trained on {len(saved['pseudo_labels_cases'])}, now "
                             f"{len(self.pseudo_set.cases)} (least confident share left out: "
                             f"{self.pseudo_set.drop}, dropped {self.pseudo_set.dropped})")
            if diffs:
                raise ValueError(f"Cannot resume from {filename_or_checkpoint}: it was trained with other settings "
                                 f"or pseudo labels.\n  " + "\n  ".join(diffs) + "\nStart a new run in a fresh output "
                                 "folder (move the old fold folder away first; nothing was overwritten).")
        super().load_checkpoint(filename_or_checkpoint)


def student_class(name: str, config: SelfTrainingConfig, doc: str, module: str) -> type:
    """A student trainer class ``name`` with ``config``: SelfTrainingMixin on nnUNetTrainer, or on nnU-Net's
    ``nnUNetTrainerDA5`` (stronger augmentation) when ``config.strong_augmentation``."""
    from nnunet_proto.training.compat import nnUNetTrainerDA5

    base = nnUNetTrainerDA5 if config.strong_augmentation else nnUNetTrainer
    return type(name, (SelfTrainingMixin, base), {"config": config, "__doc__": doc, "__module__": module,
                                                  "__qualname__": name})


#: suffix -> (changes to the default config, what the variant is for); ``nnUNetTrainerSelfTraining_<suffix>``
STUDENT_VARIANTS: Dict[str, tuple] = {
    "share25": ({"labeled_share": 0.25}, "a quarter of each batch labeled"),
    "share75": ({"labeled_share": 0.75}, "three quarters of each batch labeled"),
    "drop25": ({"drop_least_confident": 0.25}, "the least confident quarter of the pseudo labels left out"),
    "noisy": ({"strong_augmentation": True}, "noisy student: nnU-Net's stronger DA5 augmentation"),
    "scratch": ({"init_from_teacher": False}, "trains from scratch instead of from the teacher's weights (the "
                                              "default until the validation screening)"),
    # the screening's name for today's default (init_from_teacher), kept so that its runs resolve
    "fromteacher": ({"init_from_teacher": True}, "starts from the teacher's weights (= the default since the "
                                                 "validation screening)"),
    "round2": ({"round": 2}, "round 2: learns from the set of round 2 (teacher: the round-1 student)"),
    "round3": ({"round": 3}, "round 3: learns from the set of round 3 (teacher: the round-2 student)"),
}


def student_classes(base_name: str, module: str) -> Dict[str, type]:
    """{class name: class} of the default student ``base_name`` and its ``STUDENT_VARIANTS``."""
    default = SelfTrainingConfig()
    out = {base_name: student_class(base_name, default, "Offline self-training student (defaults: "
                                    f"{default.to_dict()}).", module)}
    for suffix, (changes, what) in STUDENT_VARIANTS.items():
        name = f"{base_name}_{suffix}"
        cls = student_class(name, dataclasses.replace(default, **changes), f"{base_name}: {what}.", module)
        cls.variant_of = out[base_name]
        out[name] = cls
    return out


def round_class(base_name: str, round_: int, module: str) -> str:
    """Name of the student trainer of round ``round_`` (``base_name`` for round 1, else ``_round<r>``)."""
    return base_name if round_ == 1 else f"{base_name}_round{round_}"

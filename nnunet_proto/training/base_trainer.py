"""nnUNetTrainerSemiSupervised: the one base class every nnunet_proto trainer derives from.

It keeps nnU-Net's trainer (network, supervised loss with deep supervision, optimiser, schedule,
validation, checkpoints, prediction) and adds:

* an unlabeled stream (nnU-Net's augmentation, no foreground oversampling, background workers);
* an EMA teacher over parameters and buffers, created after pretrained weights are loaded, in eval
  mode, saved in checkpoints and exported as ``checkpoint_final_teacher.pth``;
* feature taps (forward hooks) on the student and teacher for prototype methods;
* the method's loss terms with their ramp-ups, each logged per epoch and drawn in progress.png;
* opt-in weak/strong views (config ``strong_view``): the teacher on the weak view, the student on strong views
  (strong intensity + CutMix, ``ops.strong_views``), the teacher's tensors mixed with the same boxes; and an
  optional feature-perturbed student pass on the weak view (``method.feature_dropout``, UniMatch's FP stream);
* time constants (EMA decay, method momenta) resolved for this run's length (``time_constants``);
* collapse diagnostics: the teacher's pseudo-label class shares on unlabeled patches next to the labeled
  class shares, its mean confidence, the gate's kept fraction (overall and per predicted class) and the share of
  voxels where teacher and student argmax disagree, logged and plotted every epoch, with a warning when a
  foreground class vanishes from the pseudo labels; plus the method's own diagnostics;
* resolved config + method state in every checkpoint, checked and restored on ``--c``.

Leaf trainers (``trainers/``) set ``method_class`` and ``config`` and nothing else, or override
``compute_loss`` when a method needs a different step (e.g. input mixing).
"""
from __future__ import annotations

import json
import os
from time import time
from typing import Any, ClassVar, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import distributed as dist

from nnunet_proto.methods.base import SemiSupervisedConfig, SemiSupervisedMethod, StepInputs
from nnunet_proto.ops.distributed import all_reduce_gradients_, all_reduce_sum
from nnunet_proto.ops.pseudo_labels import argmax_disagreement, collapse_diagnostics, partial_collapse_names
from nnunet_proto.ops.schedules import banded_gain
from nnunet_proto.ops.strong_views import StrongIntensity, StrongView, channel_dropout, strong_view
from nnunet_proto.training.compat import (
    NonDetMultiThreadedAugmenter,
    SingleThreadedAugmenter,
    checkpoint_payload,
    get_allowed_n_proc_DA,
    is_compiled,
    nnUNetTrainer,
    unwrap_network,
)
from nnunet_proto.training.ema import EMATeacher
from nnunet_proto.training.feature_tap import FeatureTap, layer_channels
from nnunet_proto.training.precision import (
    cpu_precision,
    float32_fields,
    float32_math,
    log_cpu_bf16,
    out_of_memory_advice,
    step_autocast,
)
from nnunet_proto.training.progress import (
    CLIP_NORM,
    COLLAPSE_EPOCHS,
    COLLAPSE_RATIO,
    DIAG_PREFIX,
    PREFIX,
    SemiSupervisedLogger,
    class_label,
    class_names_from_dataset_json,
    collapse_keys,
    collapsing_classes,
)
from nnunet_proto.training.stage_switch import refuse_stray_warm_start
from nnunet_proto.training.unlabeled import (
    UnlabeledDataLoader,
    UnlabeledDataset,
    cases_from_folder,
    cases_from_labeled,
    cases_from_split,
    check_input_channels,
    load_fold,
    preprocess_command,
    preprocessing_fingerprint,
    unlabeled_folder,
)

#: key of our extra state in nnU-Net checkpoint files
CHECKPOINT_KEY = "nnunet_proto"
CHECKPOINT_FORMAT = 1
TEACHER_CHECKPOINT = "checkpoint_final_teacher.pth"


class TimedLoader:
    """Wraps a batch iterator and accumulates the seconds spent waiting in ``next``."""

    def __init__(self, loader):
        self.loader = loader
        self.waited = 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time()
        item = next(self.loader)
        self.waited += time() - t0
        return item


def _finish(loader) -> None:
    if isinstance(loader, TimedLoader):
        loader = loader.loader
    if isinstance(loader, NonDetMultiThreadedAugmenter):
        loader._finish()


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (nnU-Net's loaders and transforms use them)."""
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def atomic_torch_save(obj: Any, filename: str) -> None:
    """torch.save to a temporary file, then rename: a crash mid-write never corrupts the old file."""
    tmp = filename + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, filename)


def save_checkpoint_with(trainer, filename: str, key: str, extra) -> None:
    """nnUNetTrainer.save_checkpoint's file plus ``{key: extra()}`` in one atomic write (rank 0 only, and not when
    checkpointing is disabled, as nnU-Net does)."""
    if trainer.local_rank != 0:
        return
    if trainer.disable_checkpointing:
        trainer.print_to_log_file("No checkpoint written, checkpointing is disabled")
        return
    checkpoint = checkpoint_payload(trainer)
    checkpoint[key] = extra()
    atomic_torch_save(checkpoint, filename)


class nnUNetTrainerSemiSupervised(nnUNetTrainer):
    """Abstract base: leaf classes set ``method_class`` and ``config``."""

    method_class: ClassVar[Optional[type]] = None
    config: ClassVar[Optional[SemiSupervisedConfig]] = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.method_class is None or self.config is None:
            raise TypeError(f"{type(self).__name__} is abstract: use a leaf trainer such as nnUNetTrainerCPCL or "
                            f"nnUNetTrainerMeanTeacher (set method_class and config).")
        if self.label_manager.has_regions:
            raise ValueError(f"{type(self).__name__} does not support region-based training yet: dataset.json "
                             f"'labels' defines overlapping regions {self.label_manager.foreground_regions}. "
                             f"Train this dataset with plain nnUNetTrainer, or convert the labels to integer "
                             f"classes (one class per voxel).")
        if self.is_cascaded:
            raise ValueError(f"{type(self).__name__} does not support cascade configurations "
                             f"({configuration!r} needs segmentations of a previous stage, which unlabeled cases "
                             f"do not have). Use 2d, 3d_fullres or 3d_lowres.")
        self.method: SemiSupervisedMethod = self.method_class(self.config)
        if self.config.strong_view:
            self.check_strong_view()
        self.teacher: Optional[EMATeacher] = None
        self.method_modules: Optional[torch.nn.Module] = None  # method-owned trainable modules
        self.teacher_modules: Optional[EMATeacher] = None  # their EMA copy
        self.student_taps: Dict[str, FeatureTap] = {}
        self.teacher_taps: Dict[str, FeatureTap] = {}
        self.dataloader_unlabeled = None
        self.unlabeled_info: Dict[str, Any] = {}
        self._iter_in_epoch = 0
        self._epoch_wait = {"labeled": 0.0, "unlabeled": 0.0}
        self.precision = cpu_precision()  # NNUNET_PROTO_CPU_PRECISION (bf16 autocast on CPU, opt-in)
        self._start_epoch = 0
        self._step_collapse: Dict[str, torch.Tensor] = {}
        self._probe_terms: Optional[Dict[str, torch.Tensor]] = None  # weighted terms of a gradient-probe step
        self._epoch_probe: Dict[str, float] = {}  # this epoch's probed gradient norms
        self._probe_weights: Dict[str, float] = {}  # the effective weights of the probed step
        # config weight_band: per-term gains on the method's weights, moved by the gradient probe (1: as written)
        self.weight_gains: Dict[str, float] = {name: 1.0 for name in self.method.term_names}
        num_classes = self.label_manager.num_segmentation_heads
        self.diagnostic_keys = tuple(self.method.diagnostic_keys(num_classes))
        self.logger.local_logger = SemiSupervisedLogger(
            self.method.term_names,
            num_classes=num_classes if (self.method.uses_teacher or self.method.student_sees_unlabeled) else 0,
            diagnostic_names=self.diagnostic_keys, class_names=class_names_from_dataset_json(self.dataset_json))

    # ------------------------------------------------------------------ configuration
    def check_strong_view(self) -> None:
        """Refuse ``strong_view`` where the shared step cannot apply it: a trainer with its own step (copy-paste
        trainers mix their own batches) or a method whose student does not see the unlabeled patches."""
        own_step = type(self).compute_loss is not nnUNetTrainerSemiSupervised.compute_loss
        if own_step or not self.method.student_sees_unlabeled:
            why = ("it has its own training step (compute_loss), which the shared strong view does not enter"
                   if own_step else "its student does not see the unlabeled patches")
            raise ValueError(f"{type(self).__name__} cannot use strong_view=True: {why}. Use strong_view=False, or a "
                             f"teacher-student trainer on the shared step (Mean Teacher, CPCL with "
                             f"student_unlabeled_features, PCCS, UniMatch).")

    @property
    def unlabeled_batch_size(self) -> int:
        return self.config.unlabeled_batch_size or self.batch_size

    @property
    def global_step(self) -> int:
        """Optimiser steps done so far (restored by --c at the start of the resumed epoch)."""
        return self.current_epoch * self.num_iterations_per_epoch + self._iter_in_epoch

    @property
    def progress(self) -> float:
        return min(1.0, self.global_step / max(1, self.num_epochs * self.num_iterations_per_epoch))

    @property
    def run_steps(self) -> int:
        """Optimiser steps of the whole run, num_epochs × num_iterations_per_epoch."""
        return max(1, self.num_epochs * self.num_iterations_per_epoch)

    def resolve_time_constants(self) -> Dict[str, Any]:
        """Tell the method this run's length and return its resolved time constants (EMA decay, ...)."""
        self.method.set_run_steps(self.run_steps)
        return self.method.time_constants()

    def resolved_config(self) -> Dict[str, Any]:
        """Method config plus the trainer settings that change what the method computes."""
        return {"trainer": type(self).__name__, "method": type(self.method).__name__,
                "config": self.config.to_dict(), "num_epochs": self.num_epochs,
                "num_iterations_per_epoch": self.num_iterations_per_epoch,
                "time_constants": self.resolve_time_constants()}

    # ------------------------------------------------------------------ setup
    def initialize(self):
        if self.config.seed is not None and not self.was_initialized:
            seed_everything(self.config.seed + self.local_rank)
        super().initialize()
        student = unwrap_network(self.network)
        self.student_taps = {layer: FeatureTap(student, layer) for layer in self.method.feature_layers}
        arch = self.configuration_manager.network_arch_init_kwargs
        channels = {layer: layer_channels(arch, layer) for layer in self.method.feature_layers}
        modules = self.method.build_modules(channels, self.label_manager.num_segmentation_heads,
                                            len(self.configuration_manager.patch_size))
        if modules is not None:
            self.method_modules = modules.to(self.device)
            self.optimizer.add_param_group({"params": list(self.method_modules.parameters())})
        self.resolve_time_constants()  # after build_modules: some methods resolve by dimensionality

    def trainable_parameters(self) -> List[torch.nn.Parameter]:
        if self.optimizer is not None:  # the optimizer's lists: no walk over the module tree every step
            return [p for group in self.optimizer.param_groups for p in group["params"]]
        params = list(self.network.parameters())
        if self.method_modules is not None:
            params += list(self.method_modules.parameters())
        return params

    def _ensure_teacher(self) -> None:
        if not self.method.uses_teacher:
            return
        decay = self.resolve_time_constants()["ema_decay"]
        if self.teacher is None:
            self.teacher = EMATeacher(unwrap_network(self.network), decay, self.config.ema_warmup)
            self.teacher_taps = {}
        if self.method_modules is not None and self.teacher_modules is None:
            self.teacher_modules = EMATeacher(self.method_modules, decay, self.config.ema_warmup)
        for teacher in (self.teacher, self.teacher_modules):  # the run length may have changed since creation
            if teacher is not None:
                teacher.decay = decay
        # the teacher only needs the highest-resolution output
        self.teacher.module.decoder.deep_supervision = False
        for layer in self.method.feature_layers:
            if layer not in self.teacher_taps:
                self.teacher_taps[layer] = FeatureTap(self.teacher.module, layer)

    def reset_teacher(self) -> None:
        """Re-create the teacher (and its module copies) from the current student, e.g. at a stage switch."""
        for tap in self.teacher_taps.values():
            tap.remove()
        self.teacher, self.teacher_modules, self.teacher_taps = None, None, {}
        self._ensure_teacher()

    def find_unlabeled_cases(self):
        """Unlabeled cases of this fold and configuration, or a clear error saying how to provide them."""
        from nnunet_proto.training.compat import nnUNet_raw

        sources = self.config.unlabeled_sources
        base = self.preprocessed_dataset_folder_base
        data_id = self.configuration_manager.data_identifier
        dataset_name = self.plans_manager.dataset_name
        cases = []
        fold_dict = load_fold(os.path.join(base, "splits_final.json"), self.fold)
        if "split" in sources and fold_dict is not None:
            cases += cases_from_split(fold_dict, self.preprocessed_dataset_folder, self.fold)
        if "labeled" in sources:  # the labeled-images control: no unlabeled image at all
            if fold_dict is None:
                raise ValueError(f"the labeled-images control needs fold {self.fold} in splits_final.json")
            cases += cases_from_labeled(fold_dict, self.preprocessed_dataset_folder, self.fold)
        if "folder" in sources:
            fingerprint = preprocessing_fingerprint(self.plans_manager.plans, self.configuration_name,
                                                    self.dataset_json)
            raw_unlabeled = (os.path.join(nnUNet_raw.get(), dataset_name, "imagesUnlabeled")
                             if nnUNet_raw.is_set() else None)
            folder_cases = cases_from_folder(base, data_id, fingerprint, self.configuration_name, dataset_name,
                                             raw_unlabeled, self.dataset_json["file_ending"],
                                             plans_identifier=self.plans_manager.plans_name)
            if not folder_cases and raw_unlabeled and os.path.isdir(raw_unlabeled) and os.listdir(raw_unlabeled):
                raise FileNotFoundError(
                    f"{raw_unlabeled} holds unlabeled images, but they are not preprocessed for configuration "
                    f"{self.configuration_name!r} (expected {unlabeled_folder(base, data_id)}). Run "
                    f"`{preprocess_command(dataset_name, self.configuration_name, self.plans_manager.plans_name)}` "
                    f"first.")
            cases += folder_cases
        if not cases:
            raise FileNotFoundError(
                f"No unlabeled data for {dataset_name}, configuration {self.configuration_name!r}, fold {self.fold}. "
                f"Either put unlabeled images into nnUNet_raw/{dataset_name}/imagesUnlabeled/ and run "
                f"`{preprocess_command(dataset_name, self.configuration_name, self.plans_manager.plans_name)}`, "
                f"or simulate label scarcity with `nnunet_proto make-splits -d {dataset_name} --labeled 10%` and "
                f"train the fold it prints (its 'unlabeled' list must not be empty). Sources enabled in this "
                f"trainer's config: {list(sources)}.")
        train_keys = set(fold_dict.get("train", [])) if fold_dict else set()
        clash = sorted(c.identifier for c in cases if c.source == "split" and c.identifier in train_keys)
        if clash:
            raise ValueError(f"unlabeled cases {clash[:5]} are also labeled training cases of fold {self.fold}")
        return cases

    def get_unlabeled_dataloader(self):
        cases = self.find_unlabeled_cases()
        check_input_channels(self.num_input_channels, cases)
        dataset = UnlabeledDataset(cases)
        rotation, do_dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        cm = self.configuration_manager
        transforms = self.get_training_transforms(
            cm.patch_size, rotation, None, mirror_axes, do_dummy_2d, use_mask_for_norm=cm.use_mask_for_norm,
            is_cascaded=False, foreground_labels=self.label_manager.foreground_labels, regions=None,
            ignore_label=self.label_manager.ignore_label)
        loader = UnlabeledDataLoader(dataset, self.unlabeled_batch_size, initial_patch_size, cm.patch_size,
                                     self.label_manager, transforms=transforms)
        budget = get_allowed_n_proc_DA()
        workers = self.config.unlabeled_workers
        if workers is None:
            workers = 0 if budget == 0 else max(1, budget // 2)
        if workers == 0:
            stream = SingleThreadedAugmenter(loader, None)
        else:
            stream = NonDetMultiThreadedAugmenter(loader, None, workers, num_cached=max(6, workers), seeds=None,
                                                  pin_memory=self.device.type == "cuda", wait_time=0.002)
        next(stream)  # start the workers now, like nnU-Net does for its own loaders
        self.unlabeled_info = {"num_cases": len(dataset.identifiers), "sources": dataset.sources(),
                               "batch_size": self.unlabeled_batch_size, "workers": workers,
                               "case_ids": {src: sorted(c.identifier for c in cases if c.source == src)
                                            for src in dataset.sources()}}
        return stream

    def on_train_start(self):
        refuse_stray_warm_start(self)
        super().on_train_start()
        self.dataloader_unlabeled = TimedLoader(self.get_unlabeled_dataloader())
        self.dataloader_train = TimedLoader(self.dataloader_train)
        self._ensure_teacher()
        info = self.unlabeled_info
        tc = self.resolve_time_constants()
        self.print_to_log_file(
            f"nnunet_proto {type(self).__name__}: method {type(self.method).__name__}, "
            f"{info['num_cases']} unlabeled cases {info['sources']}, labeled batch {self.batch_size}, "
            f"unlabeled batch {info['batch_size']} ({info['workers']} workers), teacher "
            f"{'EMA %.4f' % self.teacher.decay if self.teacher is not None else 'none'}, "
            f"features {', '.join(self.method.feature_layers) or 'none'}")
        if self.config.weight_band is not None:
            probed = self.grad_probe and not self.is_ddp and not is_compiled(self.network)
            self.print_to_log_file(
                f"weight band {list(self.config.weight_band)}: each term's gain moves so that its gradient share at "
                f"full ramp lands in the band (gains now {self.weight_gains})" if probed else
                "WARNING: weight_band needs the gradient probe, which is off under DDP and torch.compile; the "
                "weights stay as the method writes them (gains 1)")
        if self.config.strong_view:
            self.print_to_log_file(
                f"strong view: the teacher predicts on the weak view (nnU-Net's augmentation), the student trains on "
                f"{self.method.num_strong_views} strong view(s) (intensity p {self.config.strong_intensity_p:g}, "
                f"CutMix p {self.config.cutmix_p:g}; ops/strong_views.py), teacher targets mixed with the same boxes")
        self.print_to_log_file("time constants for this run of " + str(self.run_steps) + " steps: "
                               + ", ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in tc.items()))
        self.write_resolved_config()
        self._start_epoch = self.current_epoch
        log_cpu_bf16(self.device, self.precision, self.print_to_log_file, "method maths, weights and optimiser")

    def write_resolved_config(self) -> None:
        """(Re)write ``nnunet_proto_config.json`` on rank 0, e.g. again after a stage switch changed it."""
        if self.local_rank == 0:
            with open(os.path.join(self.output_folder, "nnunet_proto_config.json"), "w") as f:
                json.dump({**self.resolved_config(), "unlabeled": self.unlabeled_info,
                           "cpu_precision": self.precision}, f, indent=2, default=str)

    def run_training(self):
        try:
            super().run_training()
        except torch.cuda.OutOfMemoryError as exc:
            if self.current_epoch != self._start_epoch or self._iter_in_epoch != 0:
                raise
            advice = out_of_memory_advice(type(self).__name__, self.batch_size, self.unlabeled_batch_size,
                                          self.configuration_name)
            self.print_to_log_file(advice)
            raise torch.cuda.OutOfMemoryError(f"{advice}\n(original error: {exc})") from exc

    def on_train_end(self):
        if isinstance(self.dataloader_train, TimedLoader):
            self.dataloader_train = self.dataloader_train.loader  # nnU-Net shuts down its own augmenters
        super().on_train_end()
        _finish(self.dataloader_unlabeled)
        self.dataloader_unlabeled = None
        if self.local_rank == 0 and self.teacher is not None and not self.disable_checkpointing:
            self.save_teacher_checkpoint(os.path.join(self.output_folder, TEACHER_CHECKPOINT))

    # ------------------------------------------------------------------ training step
    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._iter_in_epoch = 0
        for loader in (self.dataloader_train, self.dataloader_unlabeled):
            if isinstance(loader, TimedLoader):
                loader.waited = 0.0

    def train_step(self, batch: dict) -> dict:
        data_l = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        data_u = next(self.dataloader_unlabeled)["data"].to(self.device, non_blocking=True)

        self.optimizer.zero_grad(set_to_none=True)
        probe = self.grad_probe and self._iter_in_epoch == 0 and not self.is_ddp and not is_compiled(self.network)
        self._probe_terms = {} if probe else None
        with step_autocast(self.device, self.precision):
            total, logs = self.compute_loss(data_l, target, data_u)
        if probe:  # kept aside: nnU-Net collates the same keys from every step's output
            self._epoch_probe = {k: float(v) for k, v in self.probe_gradient_norms(self._probe_terms).items()}
        self._probe_terms = None

        if self.grad_scaler is not None:
            self.grad_scaler.scale(total).backward()
            self.grad_scaler.unscale_(self.optimizer)
            grad_norm = self._sync_and_clip()
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            total.backward()
            grad_norm = self._sync_and_clip()
            self.optimizer.step()
        logs["gradnorm_total"] = grad_norm
        self.after_optimizer_step()
        self._iter_in_epoch += 1
        out = {"loss": total.detach().cpu().numpy()}
        out.update({PREFIX + k: float(v) for k, v in logs.items()})
        if self._step_collapse:  # one host transfer for all values (GPU: one sync, not one per class)
            values = torch.stack([v.float() for v in self._step_collapse.values()]).tolist()
            out.update({PREFIX + k: v for k, v in zip(self._step_collapse, values)})
        self._step_collapse = {}
        diagnostics, self.method.diagnostics = self.method.diagnostics, {}
        unknown = set(diagnostics) - set(self.diagnostic_keys)
        if unknown:
            raise RuntimeError(f"{type(self.method).__name__} reported diagnostics {sorted(unknown)} it did not "
                               f"declare; add them to diagnostic_names / diagnostic_keys() "
                               f"(declared: {list(self.diagnostic_keys)})")
        out.update({DIAG_PREFIX + k: float(v) for k, v in diagnostics.items()})
        return out

    def record_pseudo_label_diagnostics(self, teacher_logits_u: Optional[torch.Tensor], target_l: torch.Tensor,
                                        disagreement: Optional[torch.Tensor] = None) -> None:
        """Collapse diagnostics of this step from the teacher's logits on the *un-mixed* unlabeled patches
        (single-network methods: the student's own logits on them, detached).

        Called by the shared ``compute_loss`` and by every trainer with its own step (copy-paste), so that all
        trainers log the same numbers; the gate is the method's ``gate_teacher`` (config ``pseudo_label_threshold``,
        ``threshold_mode``, ``pseudo_label_keep``). ``disagreement``: :meth:`teacher_disagreement` of this step
        (None: logged as NaN, e.g. for the copy-paste trainers, whose student never sees an un-mixed patch).
        """
        if teacher_logits_u is None:
            return
        self._step_collapse = collapse_diagnostics(
            teacher_logits_u, target_l, self.label_manager.num_segmentation_heads,
            ignore_index=self.label_manager.ignore_label, pseudo=self.method.gate_teacher(teacher_logits_u),
            disagreement=disagreement)

    def teacher_disagreement(self, student_logits_u: Optional[torch.Tensor], student_input_u: torch.Tensor,
                             teacher_logits_u: torch.Tensor, teacher_input_u: torch.Tensor) -> Optional[torch.Tensor]:
        """Share of unlabeled voxels where the teacher's and the student's argmax differ on the *same* input
        (``ops.pseudo_labels.argmax_disagreement``): 0 for a teacher that is a copy of the student.

        Where the teacher saw the student's input (``teacher_input`` is the identity and no strong view: CPCL, PCCS)
        every step measures it from the logits the step has. Where the views differ (Mean Teacher's input noise, the
        strong view) the difference of views would add to the lag, so on the first step of every epoch the teacher
        predicts once more, on the student's input (one extra forward without gradient per epoch; no random draw,
        so training is unchanged), and the other steps give None. None also without student logits on the
        unlabeled patches (CPCL's paper form). ``student_logits_u`` (B_u, C, *S): the student's first view.
        """
        if student_logits_u is None:
            return None
        if teacher_input_u is student_input_u:
            return argmax_disagreement(teacher_logits_u, student_logits_u)
        if self._iter_in_epoch != 0:
            return None
        same_input, _ = self.teacher_forward(student_input_u)
        return argmax_disagreement(same_input, student_logits_u)

    def _sync_and_clip(self) -> torch.Tensor:
        """Average method-module gradients across ranks, clip like nnU-Net; returns the norm before clipping."""
        if self.method_modules is not None:  # DDP averages only self.network's gradients
            all_reduce_gradients_(self.method_modules.parameters())
        return torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), CLIP_NORM).detach()

    #: measure each weighted term's gradient norm on the first step of every epoch (a few extra backward
    #: passes per epoch). Off in DDP, where autograd.grad bypasses the gradient reducer, and under torch.compile,
    #: whose compiled backward donates its buffers and cannot be run with retain_graph.
    grad_probe: ClassVar[bool] = True

    def probe_gradient_norms(self, terms: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``{"gradnorm_<name>": ‖∂term/∂θ‖}`` over the trainable parameters for the weighted terms of this step.

        Shows which term drives the network: a term whose weighted gradient dwarfs the supervised one
        decides the direction of every step, and nnU-Net's clipping (norm 12) then also shrinks the
        supervised update. Under a GradScaler the terms are scaled before and the norms unscaled after, as in
        the real backward pass. A term outside the graph (weight exactly 0 with a detached value) gives 0.
        """
        params = [p for p in self.trainable_parameters() if p.requires_grad]
        scale = float(self.grad_scaler.get_scale()) if self.grad_scaler is not None else 1.0
        norms = {}
        for name, value in terms.items():
            if not value.requires_grad:
                norms[f"gradnorm_{name}"] = torch.zeros((), device=value.device)
                continue
            grads = torch.autograd.grad(value * scale, params, retain_graph=True, allow_unused=True)
            squares = [g.float().pow(2).sum() for g in grads if g is not None]
            norm = torch.stack(squares).sum().sqrt() / scale if squares else torch.zeros((), device=value.device)
            norms[f"gradnorm_{name}"] = norm.detach()
        return norms

    def after_optimizer_step(self) -> None:
        if self.teacher is not None:
            self.teacher.update(unwrap_network(self.network), self.global_step)
        if self.teacher_modules is not None:
            self.teacher_modules.update(self.method_modules, self.global_step)

    def deep_supervision_weights(self, num_outputs: int) -> Tuple[float, ...]:
        """nnU-Net's own deep-supervision weights (``DeepSupervisionWrapper.weight_factors``), or (1,) without DS.

        For trainers that build their own supervised loss over the network's outputs (copy-paste).
        """
        weights = getattr(self.loss, "weight_factors", None)
        if weights is None:
            weights = (1.0,)
        if len(weights) != num_outputs:
            raise RuntimeError(f"the network returned {num_outputs} outputs but nnU-Net's loss has {len(weights)} "
                               f"deep-supervision weights")
        return tuple(float(w) for w in weights)

    def enter_last_stage(self) -> None:
        """Switch a staged method (pre-training, then self-training) to its last stage now.

        For tests and tools that must exercise every loss term in the stage where it is used; single-stage
        trainers do nothing. Staged trainers override it with their own stage switch.
        """

    def teacher_forward(self, data: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Teacher's full-resolution logits and tapped features {layer: tensor} (no grad, eval mode)."""
        out = self.teacher(data)
        logits = out[0] if isinstance(out, (list, tuple)) else out
        return logits, {layer: tap.pop() for layer, tap in self.teacher_taps.items()}

    def compute_loss(self, data_l: torch.Tensor, target, data_u: torch.Tensor) -> Tuple[torch.Tensor, Dict]:
        """Supervised nnU-Net loss on labeled patches + weighted method terms. Returns (total, logs)."""
        method = self.method
        n_l = data_l.shape[0]
        sees_u = method.student_sees_unlabeled
        views = self.strong_views(data_u) if self.config.strong_view else []  # [] keeps the step bit for bit
        x_u = torch.cat([v.images for v in views]) if views else data_u
        x = torch.cat([data_l, x_u]) if sees_u else data_l
        out = self.network(x)
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        features = {layer: tap.pop() for layer, tap in self.student_taps.items()}
        out_l = [o[:n_l] for o in outs]
        sup = self.loss(out_l if isinstance(out, (list, tuple)) else out_l[0], target)
        target_full = target[0] if isinstance(target, list) else target

        t_logits, t_features, t_weak = None, {}, None
        if self.teacher is not None:
            # strong view: the teacher sees the weak view as delivered (no teacher_input perturbation)
            t_input = data_u if views else method.teacher_input(data_u)
            t_logits, t_features = self.teacher_forward(t_input)
            n_u = data_u.shape[0]  # the student's first (or only) view of the unlabeled patches
            disagreement = self.teacher_disagreement(outs[0][n_l:n_l + n_u] if sees_u else None,
                                                     x_u[:n_u] if views else data_u, t_logits, t_input)
            self.record_pseudo_label_diagnostics(t_logits, target_full,  # the un-mixed weak-view logits
                                                 disagreement=disagreement)
            if views:  # the student's voxel v and the teacher's target at v come from the same image
                t_weak = t_logits
                t_logits = torch.cat([v.mix(t_logits) for v in views])
                t_features = {k: torch.cat([v.mix(f) for v in views]) for k, f in t_features.items()}
        elif sees_u:  # single-network methods (MSPA): the network's own predictions are the pseudo-label source
            self.record_pseudo_label_diagnostics(outs[0][n_l:].detach(), target_full)
        primary = method.feature_layers[0] if method.feature_layers else None
        feats = features.get(primary)
        inputs = StepInputs(
            num_classes=self.label_manager.num_segmentation_heads,
            ignore_index=self.label_manager.ignore_label,
            target_l=target_full, logits_l=outs[0][:n_l],
            feats_l=feats[:n_l] if feats is not None else None,
            logits_u=outs[0][n_l:] if sees_u else None,
            feats_u=feats[n_l:] if (feats is not None and sees_u) else None,
            teacher_logits_u=t_logits, teacher_feats_u=t_features.get(primary),
            features=features, teacher_features=t_features,
            modules=self.method_modules,
            teacher_modules=self.teacher_modules.module if self.teacher_modules is not None else None,
            data_l=data_l, data_u=data_u, reduce_fn=all_reduce_sum, progress=self.progress,
            data_u_strong=x_u if views else None, teacher_logits_weak_u=t_weak,
            logits_fp_u=(self.feature_perturbed_logits(data_u, method.feature_dropout)
                         if method.feature_dropout is not None else None))
        terms = self.method_losses(inputs)
        return self.combine(sup, terms)

    def strong_views(self, data_u: torch.Tensor) -> List[StrongView]:
        """``method.num_strong_views`` independent strong views of the unlabeled patches (config ``strong_view``):
        strong intensity perturbations, then CutMix between the patches (``ops.strong_views``), each with its boxes.

        Drawn from torch's global RNGs of the data's device and the CPU (seeded by config ``seed``), like the
        copy-paste boxes, so a seeded CPU run replays them.
        """
        intensity = StrongIntensity(p=self.config.strong_intensity_p)
        return [strong_view(data_u, intensity, self.config.cutmix_p) for _ in range(self.method.num_strong_views)]

    def feature_perturbed_logits(self, data: torch.Tensor, p: float) -> torch.Tensor:
        """The student's highest-resolution logits on ``data`` with channel dropout ``p`` on every encoder output (the
        skips and the bottleneck) before the decoder: UniMatch's feature-perturbation stream, with gradient.

        A forward hook on ``network.encoder`` of the unwrapped network (eager: a hook added to a compiled network
        would be ignored; under DDP the gradients still reach the reducer through the shared parameters). The
        feature taps fired on this pass too; they are cleared, the method reads the main pass's features.
        """
        net = unwrap_network(self.network)

        def drop(module, inputs, output):
            if isinstance(output, (list, tuple)):
                return type(output)(channel_dropout(o, p) for o in output)
            return channel_dropout(output, p)

        handle = net.encoder.register_forward_hook(drop)
        try:
            out = net(data)
        finally:
            handle.remove()
        for tap in self.student_taps.values():
            tap.clear()
        return out[0] if isinstance(out, (list, tuple)) else out

    def method_losses(self, inputs: StepInputs) -> Dict[str, torch.Tensor]:
        """The method's loss terms, computed in float32 with autocast off (fp16/bf16 network outputs are cast)."""
        with float32_math(self.device.type):
            return self.method.losses(float32_fields(inputs))

    def combine(self, sup: torch.Tensor, terms: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict]:
        """total = sup + Σ_k w_k(t)·term_k; every term always enters the graph (weight may be ~0)."""
        weights = self.effective_weights(self.progress)
        missing = set(self.method.term_names) - set(terms)
        if missing:
            raise RuntimeError(f"{type(self.method).__name__} did not return loss terms {sorted(missing)}")
        total = sup
        logs: Dict[str, float] = {"loss_sup": sup.detach()}
        if self._probe_terms is not None:  # a gradient-probe step (train_step): keep the attached terms
            self._probe_weights = dict(weights)
            self._probe_terms["sup"] = sup
            self._probe_terms.update({name: weights[name] * terms[name] for name in self.method.term_names})
        for name in self.method.term_names:
            total = total + weights[name] * terms[name]
            logs[f"loss_{name}"] = terms[name].detach()
            logs[f"weight_{name}"] = weights[name]
        return total, logs

    def effective_weights(self, progress: float) -> Dict[str, float]:
        """The method's weights λ_k(t) times the per-term gains of ``weight_band`` (1 without it)."""
        weights = self.method.weights(progress)
        return {name: w * self.weight_gains.get(name, 1.0) for name, w in weights.items()}

    def adapt_weight_gains(self, probe: Dict[str, float]) -> None:
        """``weight_band``: move each term's gain so that its gradient share at full ramp lands in the band
        (``ops.schedules.banded_gain``), from this epoch's probe (the weighted gradient norms of its first step)."""
        band = self.config.weight_band
        sup = probe.get("gradnorm_sup", 0.0)
        if band is None or not probe or not sup > 0:
            return
        full = self.method.weights(1.0)
        changes = []
        for name in self.method.term_names:
            used, norm = self._probe_weights.get(name, 0.0), probe.get(f"gradnorm_{name}", 0.0)
            if used <= 0 or not full.get(name, 0.0) > 0:
                continue  # no weight at the probe (e.g. stage one) or none at full ramp: nothing to measure
            ratio = norm / (used * sup)  # ‖∇L_term‖ / ‖∇L_sup‖, unweighted
            old = self.weight_gains[name]
            self.weight_gains[name] = banded_gain(old, ratio, full[name], tuple(band))
            changes.append(f"{name} {old:.4g} -> {self.weight_gains[name]:.4g} (share at full ramp "
                           f"{old * full[name] * ratio:.3g})")
        if changes:
            self.print_to_log_file(f"weight band [{band[0]:g}, {band[1]:g}] of the supervised gradient: gains "
                                   + ", ".join(changes))

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        values = {f"loss_{n}": [] for n in ["sup", *self.method.term_names]}
        values.update({f"weight_{n}": [] for n in self.method.term_names})
        values.update({k[len(PREFIX):]: [] for k in self.logger.local_logger.extra_keys()
                       if k.startswith(DIAG_PREFIX) or k in collapse_keys(self.logger.local_logger.num_classes)})
        values["gradnorm_total"] = []
        for key in values:
            values[key] = [o[PREFIX + key] for o in train_outputs if PREFIX + key in o]
        probed = ("sup", *self.method.term_names)
        for name in probed:  # probed on the epoch's first step (none: NaN)
            key = f"gradnorm_{name}"
            values[key] = [self._epoch_probe[key]] if key in self._epoch_probe else []
        self.adapt_weight_gains(self._epoch_probe)
        self._epoch_probe, self._probe_weights = {}, {}
        partial = set(partial_collapse_names(self.logger.local_logger.num_classes))
        for key in partial & set(values):  # NaN by design in some steps: the mean over the steps that measured it
            values[key] = [v for v in values[key] if v == v]
        means = {k: float(np.mean(v)) if v else float("nan") for k, v in values.items()}
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, means)
            means = {k: float(np.nanmean([g[k] for g in gathered])) for k in means}
        for key, value in means.items():
            self.logger.log(PREFIX + key, value, self.current_epoch)
        waits = {"labeled": getattr(self.dataloader_train, "waited", float("nan")),
                 "unlabeled": getattr(self.dataloader_unlabeled, "waited", float("nan"))}
        self.logger.log(PREFIX + "wait_labeled_s", waits["labeled"], self.current_epoch)
        self.logger.log(PREFIX + "wait_unlabeled_s", waits["unlabeled"], self.current_epoch)
        terms = {k: v for k, v in means.items() if k.startswith(("loss_", "weight_"))}
        self.print_to_log_file("semi-supervised terms: " + ", ".join(f"{k} {v:.4g}" for k, v in terms.items())
                               + f"; waited for data {waits['labeled']:.2f} s labeled, "
                                 f"{waits['unlabeled']:.2f} s unlabeled")
        self.print_to_log_file("gradient norms (weighted terms, first step): " + ", ".join(
            f"{name} {means[f'gradnorm_{name}']:.3g}" for name in probed)
            + f"; total before clipping at {CLIP_NORM:g} (epoch mean) {means['gradnorm_total']:.3g}")
        self.log_collapse_diagnostics(means)

    def log_collapse_diagnostics(self, means: Dict[str, float]) -> None:
        """One log line with the epoch's pseudo-label diagnostics, and the collapse warning."""
        num_classes = self.logger.local_logger.num_classes
        if num_classes and np.isfinite(means.get("pl_confidence", float("nan"))):
            fg = range(1, num_classes)
            source = "teacher" if self.teacher is not None else "network's own (no teacher)"
            self.print_to_log_file(
                f"{source} pseudo labels (unlabeled patches): class share "
                + " ".join(f"c{c} {means[f'pl_share_c{c}']:.4f}" for c in fg)
                + " | labeled patches " + " ".join(f"c{c} {means[f'labeled_share_c{c}']:.4f}" for c in fg)
                + f" | mean confidence {means['pl_confidence']:.3f}, kept by the gate "
                  f"(tau {self.config.pseudo_label_threshold:g}, {self.config.threshold_mode}"
                + (f" keep {self.config.pseudo_label_keep:g}" if self.config.threshold_mode == "quantile" else "")
                + ("" if self.config.threshold_mode == "fixed" else
                   "; per class " + " ".join(f"c{c} {means.get(f'pl_threshold_c{c}', float('nan')):.3f}"
                                             for c in range(num_classes)))
                + f") {means['pl_kept']:.3f}, per predicted class "
                + " ".join(f"c{c} {means.get(f'pl_kept_c{c}', float('nan')):.3f}" for c in range(num_classes))
                + ("" if self.teacher is None else
                   f" | teacher-student argmax disagreement {means.get('teacher_disagreement', float('nan')):.4f}"))
        diag = {k[len("diag_"):]: v for k, v in means.items() if k.startswith("diag_")}
        if diag:
            self.print_to_log_file("method diagnostics: " + ", ".join(f"{k} {v:.4g}" for k, v in diag.items()))
        collapsed = collapsing_classes(self.logger.local_logger.my_fantastic_logging, num_classes)
        if collapsed:
            names = self.logger.local_logger.class_names
            source = "teacher" if self.teacher is not None else "network"
            self.print_to_log_file(
                f"WARNING: pseudo-label collapse: class(es) {collapsed} "
                f"({', '.join(class_label(c, names) for c in collapsed)}) made up less than {COLLAPSE_RATIO:g} x "
                f"their share of the labeled patches in the {source}'s pseudo labels for the last {COLLAPSE_EPOCHS} "
                f"epochs. The {source} is losing these classes; see the collapse panel of progress.png.")

    # ------------------------------------------------------------------ checkpoints
    def extra_checkpoint_state(self) -> Dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, **self.resolved_config(),
                "method_state": self.method.state_dict(),
                "teacher": self.teacher.state_dict() if self.teacher is not None else None,
                "modules": self.method_modules.state_dict() if self.method_modules is not None else None,
                "teacher_modules": self.teacher_modules.state_dict() if self.teacher_modules is not None else None,
                "unlabeled": self.unlabeled_info, "weight_gains": dict(self.weight_gains)}

    def save_checkpoint(self, filename: str) -> None:
        save_checkpoint_with(self, filename, CHECKPOINT_KEY, self.extra_checkpoint_state)

    def save_teacher_checkpoint(self, filename: str) -> None:
        """Slim checkpoint with the teacher as ``network_weights`` for ``nnUNetv2_predict -chk``."""
        atomic_torch_save({
            "network_weights": self.teacher.module.state_dict(),
            "trainer_name": type(self).__name__,
            "init_args": self.my_init_kwargs,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            "current_epoch": self.current_epoch,
            CHECKPOINT_KEY: {"format": CHECKPOINT_FORMAT, "role": "teacher", **self.resolved_config()},
        }, filename)

    def check_resume_config(self, saved: Dict[str, Any], filename: str) -> None:
        """Refuse to resume when the checkpoint was trained with another method configuration."""
        current = self.resolved_config()
        diffs = []
        for key in ("trainer", "method", "num_epochs", "num_iterations_per_epoch"):
            if saved.get(key) != current[key]:
                diffs.append(f"{key}: checkpoint {saved.get(key)!r} vs now {current[key]!r}")
        saved_cfg, cur_cfg = saved.get("config", {}), current["config"]
        # a field added after the checkpoint was written: it was trained with that field's default
        defaults = type(self.config).field_defaults()
        for key in sorted(set(saved_cfg) | set(cur_cfg)):
            old = saved_cfg.get(key, defaults.get(key))
            if old != cur_cfg.get(key):
                diffs.append(f"config.{key}: checkpoint {old!r} vs now {cur_cfg.get(key)!r}")
        if diffs:
            raise ValueError(
                f"Cannot resume from {filename}: it was trained with a different configuration.\n  "
                + "\n  ".join(diffs)
                + "\nResume with the trainer and config that wrote it, or start a new run in a fresh output "
                  "folder (move the old fold folder away first; nothing was overwritten).")

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if not isinstance(filename_or_checkpoint, str):
            raise TypeError("load_checkpoint needs a checkpoint file name (nnU-Net 2.8.1's load_checkpoint "
                            "fails when given a dict)")
        raw = torch.load(filename_or_checkpoint, map_location="cpu", weights_only=False)
        extra = raw.get(CHECKPOINT_KEY)
        if extra is not None:
            if extra.get("role") == "teacher":
                raise ValueError(f"{filename_or_checkpoint} is the slim teacher export for prediction; resume from "
                                 f"checkpoint_latest.pth / checkpoint_final.pth instead.")
            self.check_resume_config(extra, filename_or_checkpoint)  # before any state is touched
        super().load_checkpoint(filename_or_checkpoint)
        if extra is None:
            self.print_to_log_file(f"WARNING: {filename_or_checkpoint} holds no nnunet_proto state (written by "
                                   f"plain nnU-Net?). The teacher starts as a copy of the loaded student.")
            return
        self.method.load_state_dict(extra.get("method_state", {}))
        self.weight_gains.update(extra.get("weight_gains") or {})  # weight_band's gains (absent before: all 1)
        if self.method_modules is not None:
            if extra.get("modules") is None:
                raise ValueError(f"{filename_or_checkpoint} lacks the weights of the method's own modules")
            self.method_modules.load_state_dict(extra["modules"])
        if extra.get("teacher") is not None and self.method.uses_teacher:
            self._ensure_teacher()
            self.teacher.load_state_dict(extra["teacher"])
            if self.teacher_modules is not None and extra.get("teacher_modules") is not None:
                self.teacher_modules.load_state_dict(extra["teacher_modules"])

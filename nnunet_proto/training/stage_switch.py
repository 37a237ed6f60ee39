"""Trainer side of the stage switch of the two-stage copy-paste trainers (BCP, MPER).

At the start of every stage-one epoch: read nnU-Net's validation pseudo-Dice history, ask the method
(``method.switch_decision``, see ``nnunet_proto/methods/stage_switch.py``) and either call the trainer's
``start_self_training(decision)`` or log where readiness stands.

Also the trainer side of the opt-in options of both trainers (issue 23, item 6; not validated yet, defaults
unchanged): the warm start (``stage_switch="warm_start"``: stage two from train start, the teacher reset to the
student that nnU-Net's ``-pretrained_weights`` loaded, or that ``NNUNET_PROTO_WARM_START`` names: every weight, the
segmentation heads included), nnU-Net's own loss in stage one (``stage_one_loss="plain"``)
and nnU-Net's loss on the un-mixed labeled patches beside the mixed ones in stage two
(``unmixed_supervised_weight``, term ``unmixed``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from nnunet_proto.methods.stage_switch import UNMIXED_TERM, skips_stage_one
from nnunet_proto.training.compat import pseudo_dice_history, unwrap_network
from nnunet_proto.training.variants import config_variant


def fmt_dice(dice: Optional[Sequence[float]]) -> str:
    return "none yet" if not dice else "[" + ", ".join(f"{d:.3f}" for d in dice) + "]"


def maybe_switch_stage(trainer, name: str) -> None:
    """Switch ``trainer`` to stage two now if its method says so; otherwise log the readiness (``name``: BCP, MPER)."""
    method, cfg = trainer.method, trainer.config
    if method.stage != 1:
        return
    history = pseudo_dice_history(trainer)
    decision = method.switch_decision(trainer.current_epoch, trainer.num_epochs, history)
    if decision is not None:
        trainer.start_self_training(decision)
    elif cfg.stage_switch == "ready":
        floor, cap = method.stage_one_bounds(trainer.num_epochs)
        trainer.print_to_log_file(
            f"{name} stage one at epoch {trainer.current_epoch}: validation pseudo-Dice per foreground class "
            f"{fmt_dice(history[-1] if history else None)}, switch when all >= {cfg.ready_dice:g} in "
            f"{cfg.ready_epochs} consecutive validations (epochs {floor}..{cap})")


# ---------------------------------------------------------------------- opt-in options (issue 23, item 6)
def warm_start_probe(network) -> torch.Tensor:
    """A cheap fingerprint of the student's weights (its first parameter, copied), taken at the end of
    ``initialize()``: unchanged at the start of training = nnU-Net's ``-pretrained_weights`` loaded nothing."""
    return next(unwrap_network(network).parameters()).detach().clone()


#: a plain nnU-Net checkpoint of the same dataset, plans and configuration; a warm-started run (``_warm``) that
#: starts (not one resumed with ``--c``) loads every weight of it, the segmentation heads included, which nnU-Net's
#: ``-pretrained_weights`` leaves at their random initialisation
WARM_START_ENV = "NNUNET_PROTO_WARM_START"


def load_every_weight(trainer, checkpoint: os.PathLike) -> dict:
    """Load every weight of an nnU-Net checkpoint (``network_weights``) into the trainer's student, initialising
    the trainer first; returns ``{"file", "sha256"}``. A checkpoint of other plans is refused by name."""
    from nnunet_proto.data.pseudo_labels import file_sha256

    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"warm start: {path} is not a file. Give the checkpoint_final.pth of a finished plain "
                                f"nnU-Net run of the same dataset, plans and configuration ({WARM_START_ENV}).")
    if not trainer.was_initialized:
        trainer.initialize()
    saved = torch.load(path, map_location="cpu", weights_only=False)
    weights = saved.get("network_weights") if isinstance(saved, dict) else None
    if weights is None:
        raise ValueError(f"warm start: {path} has no 'network_weights'; it is not an nnU-Net checkpoint")
    try:
        unwrap_network(trainer.network).load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"warm start: {path} does not fit this network (another dataset, plans or configuration?). "
                         f"Give a plain nnU-Net checkpoint trained with -p {trainer.plans_manager.plans_name} "
                         f"{trainer.configuration_name} on this dataset.\n{str(e).splitlines()[0]}") from None
    trainer.print_to_log_file(f"warm start: every weight of {path} loaded into the student (segmentation heads "
                              f"included)")
    return {"file": str(path), "sha256": file_sha256(path)}


def warm_starts(trainer) -> bool:
    """Whether the trainer skips stage one and needs a warm start (``stage_switch="warm_start"``)."""
    cfg = getattr(trainer, "config", None)
    return cfg is not None and hasattr(cfg, "stage_switch") and skips_stage_one(cfg)


def refuse_stray_warm_start(trainer) -> None:
    """``NNUNET_PROTO_WARM_START`` set for a trainer that does not warm-start would be ignored silently: refused."""
    if os.environ.get(WARM_START_ENV) and not warm_starts(trainer):
        raise ValueError(f"{WARM_START_ENV} is set ({os.environ[WARM_START_ENV]}), but {type(trainer).__name__} does "
                         f"not warm-start: only the _warm variants of BCP and MPER (stage_switch='warm_start') load "
                         f"it. Unset it (or use nnUNetv2_train's -pretrained_weights to initialise this trainer).")


def warm_start(trainer, name: str) -> None:
    """``stage_switch="warm_start"``: start stage two now (at train start, after nnU-Net's ``-pretrained_weights``
    were loaded into the student, or ``NNUNET_PROTO_WARM_START``'s checkpoint now), so that the teacher reset
    copies the loaded weights; log that stage one is skipped and how to warm-start. A run resumed in stage two
    (``--c``) keeps its restored teacher and state."""
    method = trainer.method
    if not skips_stage_one(trainer.config):
        return
    if method.stage != 1:
        trainer.print_to_log_file(f"{name}: stage_switch='warm_start', resumed in stage two (switch at progress "
                                  f"{method.stage_two_start}); teacher and method state as restored")
        return
    if os.environ.get(WARM_START_ENV):
        load_every_weight(trainer, os.environ[WARM_START_ENV])
    trainer.print_to_log_file(
        f"{name}: stage_switch='warm_start': stage one is SKIPPED; stage two starts at epoch {trainer.current_epoch} "
        f"and the teacher is reset to the student as loaded now. The student should be warm-started from a plain "
        f"nnU-Net checkpoint of the same plans and fold: nnUNetv2_train DATASET {trainer.configuration_name} "
        f"{trainer.fold} -tr {type(trainer).__name__} -p {trainer.plans_manager.plans_name} -pretrained_weights "
        f"<plain nnU-Net fold folder>/checkpoint_final.pth (nnU-Net's load_pretrained_weights does not transfer the "
        f"segmentation heads, seg_layers: they start from their random initialisation), or with {WARM_START_ENV}="
        f"<that checkpoint> set, which loads every weight, the heads included")
    probe = getattr(trainer, "_warm_start_probe", None)
    if probe is not None and torch.equal(probe, warm_start_probe(trainer.network)):
        trainer.print_to_log_file(
            f"WARNING: {name} warm start without pretrained weights: the student's weights did not change since "
            f"initialize(), so no -pretrained_weights were loaded. This run has NO stage one and starts self-training "
            f"from a randomly initialised student and teacher. Set {WARM_START_ENV}=<plain checkpoint_final.pth> "
            f"(every weight) or pass -pretrained_weights <plain checkpoint_final.pth> (all but the heads).")
    maybe_switch_stage(trainer, name)  # the warm-start decision: stage two now, teacher := student


def plain_stage_one(trainer) -> bool:
    """Whether this step is a stage-one step with nnU-Net's own loss (``stage_one_loss="plain"``)."""
    return trainer.method.stage == 1 and trainer.config.stage_one_loss == "plain"


def plain_stage_one_loss(trainer, data_l: torch.Tensor, target) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``stage_one_loss="plain"``: nnU-Net's own supervised loss (``trainer.loss``, deep supervision included) on
    the un-mixed labeled batch, what plain nnU-Net trains with; the method's terms are 0 (their weight is 0 in
    stage one). Returns (supervised loss, terms) for ``trainer.combine``."""
    out = trainer.network(data_l)
    for tap in trainer.student_taps.values():  # the prototype terms are not computed in this stage
        tap.clear()
    sup = trainer.loss(out, target)
    zero = sup.detach().new_zeros((), dtype=torch.float32)
    return sup, {n: zero for n in trainer.method.term_names}


def student_forward(trainer, images: torch.Tensor, data_l: torch.Tensor, target
                    ) -> Tuple[List[torch.Tensor], Optional[torch.Tensor]]:
    """The student on the mixed ``images``; in stage two with ``unmixed_supervised_weight`` > 0 also on the
    un-mixed labeled patches ``data_l``, in the same forward (concatenated after the mixed images; nnU-Net's
    InstanceNorm normalises per sample, so each output is that of its own image).

    Returns (outputs on the mixed images per deep-supervision scale, full resolution first; nnU-Net's loss
    ``trainer.loss`` of the un-mixed outputs against ``target``, or None when not asked for). Feature taps hold the
    whole concatenated batch: the caller slices them to ``images.shape[0]``.
    """
    unmixed = UNMIXED_TERM in trainer.method.term_names and trainer.method.stage == 2
    x = torch.cat([images, data_l]) if unmixed else images
    out = trainer.network(x)
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    if not unmixed:
        return outs, None
    n = images.shape[0]
    rest = [o[n:] for o in outs]
    loss = trainer.loss(rest if isinstance(out, (list, tuple)) else rest[0], target)
    return [o[:n] for o in outs], loss


def add_unmixed_term(trainer, terms: Dict[str, torch.Tensor], unmixed: Optional[torch.Tensor]
                     ) -> Dict[str, torch.Tensor]:
    """The method's terms plus ``unmixed`` when the option is on (0 in stage one, where its weight is 0)."""
    if UNMIXED_TERM not in trainer.method.term_names:
        return terms
    if unmixed is None:
        unmixed = next(iter(terms.values())).detach().new_zeros((), dtype=torch.float32)
    return {**terms, UNMIXED_TERM: unmixed}


def option_variants(base: type) -> Dict[str, type]:
    """``<base>_warm`` (no stage one: ``stage_switch="warm_start"``), ``<base>_warm_lcc`` (the same with the largest
    connected component of each class of the pseudo labels: ``pseudo_label_largest_component``) and
    ``<base>_plainstage1`` (nnU-Net's own loss in stage one), all with nnU-Net's loss on the un-mixed labeled patches
    at weight 1 in stage two; opt-in, not validated (issue 23, items 4 and 6). ``<base>_warm_labeledcontrol``: a
    control, ``_warm`` whose unlabeled stream serves the fold's labeled images with their labels unused
    (``unlabeled_sources=("labeled",)``), so no unlabeled image at all: whether ``_warm``'s gain needs them."""
    name = base.__name__
    unmixed = "nnU-Net's loss on the un-mixed labeled patches (weight 1) beside the mixed terms in stage two"
    warm = base.config.replace(stage_switch="warm_start", unmixed_supervised_weight=1.0)
    return {
        **config_variant(base, "warm", warm,
                         f"{name} without stage one (opt-in, not validated): train with {WARM_START_ENV}=<plain "
                         f"nnU-Net checkpoint_final.pth> (every weight) or nnUNetv2_train ... -pretrained_weights "
                         f"<that file> (all but the heads); the teacher is reset to the "
                         f"loaded student at the start; {unmixed}."),
        **config_variant(base, "warm_lcc", warm.replace(pseudo_label_largest_component=True),
                         f"{name}_warm with the pseudo labels cut to the largest connected component of each class "
                         f"before the gate, as BCP's code does (opt-in, not validated)."),
        **config_variant(base, "warm_labeledcontrol", warm.replace(unlabeled_sources=("labeled",)),
                         f"Control: {name}_warm whose unlabeled stream serves the fold's labeled training images with "
                         f"their labels unused (unlabeled_sources=('labeled',)): {name}_warm without any unlabeled "
                         f"image."),
        **config_variant(base, "plainstage1",
                         base.config.replace(stage_one_loss="plain", unmixed_supervised_weight=1.0),
                         f"{name} with nnU-Net's own loss on the un-mixed labeled batch in stage one and {unmixed} "
                         f"(opt-in, not validated)."),
    }

"""nnUNetTrainerSelfTraining: offline self-training (noisy student) on pseudo labels of a finished nnU-Net run.

Make the pseudo labels first (``nnunet_proto pseudo-label -d D -c C -p P -f F -tr TEACHER``), then train the
student like any nnU-Net trainer; ``nnunet_proto self-train`` runs the rounds end to end. Defaults: half of each
batch labeled, from scratch, nnU-Net's augmentation, every pseudo label kept. Variants (one setting each):
``_share25``, ``_share75``, ``_drop25``, ``_noisy`` (nnU-Net's DA5 augmentation), ``_fromteacher``,
``_round2``, ``_round3``; short schedules ``_smoke``, ``_demo``, ``_5epochs`` ... See
nnunet_proto/training/self_training.py and docs/methods/self_training.md.
"""
from nnunet_proto.training.self_training import student_classes
from nnunet_proto.training.variants import SCHEDULES, schedule_variant

globals().update(student_classes("nnUNetTrainerSelfTraining", __name__))
globals().update({c.__name__: c for c in (schedule_variant(nnUNetTrainerSelfTraining, suffix, *spec)  # noqa: F821
                                          for suffix, spec in SCHEDULES.items())})
globals().update({c.__name__: c for c in (schedule_variant(nnUNetTrainerSelfTraining_round2, suffix, *spec)  # noqa: F821
                                          for suffix, spec in SCHEDULES.items() if suffix in ("smoke", "demo"))})

"""Evaluation of prediction folders: Dice, IoU, HD95 and ASD in mm (see ``metrics``)."""
from nnunet_proto.evaluation.metrics import METRIC_NAMES, binary_metrics, case_metrics, evaluate_folders

__all__ = ["METRIC_NAMES", "binary_metrics", "case_metrics", "evaluate_folders"]

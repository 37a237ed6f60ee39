"""Pure tensor operations (torch only): prototypes, schedules, losses, distributed helpers."""
from nnunet_proto.ops.distributed import all_reduce_mean_, all_reduce_sum, is_distributed, world_size
from nnunet_proto.ops.losses import cross_entropy_ignore, masked_mean, softmax_mse
from nnunet_proto.ops.prototypes import (
    Prototypes,
    any_valid,
    class_feature_sums,
    cosine_similarity_map,
    labels_to_onehot,
    mask_invalid_logits,
    masked_average_pooling,
    prototype_logits,
    resize_logits,
    resize_masks,
)
from nnunet_proto.ops.pseudo_labels import (
    PseudoLabels,
    argmax_disagreement,
    class_relative_thresholds,
    class_shares,
    collapse_diagnostic_names,
    collapse_diagnostics,
    confidence_gate,
    gate_logits,
    gate_pseudo_labels,
    pseudo_label_stat_names,
    pseudo_label_stats,
    quantile_gate,
)
from nnunet_proto.ops.schedules import (
    ema_decay,
    ema_horizon,
    fraction_to_steps,
    linear_rampup,
    run_fraction,
    run_relative_decay,
    sigmoid_rampup,
)

__all__ = [
    "PseudoLabels", "argmax_disagreement", "class_relative_thresholds", "class_shares", "confidence_gate",
    "collapse_diagnostic_names",
    "collapse_diagnostics", "ema_horizon",
    "fraction_to_steps", "gate_logits", "gate_pseudo_labels",
    "pseudo_label_stat_names", "pseudo_label_stats", "quantile_gate", "run_fraction", "run_relative_decay",
    "Prototypes", "all_reduce_mean_", "all_reduce_sum", "any_valid", "class_feature_sums",
    "cosine_similarity_map", "cross_entropy_ignore", "ema_decay", "is_distributed", "labels_to_onehot",
    "linear_rampup", "mask_invalid_logits", "masked_average_pooling", "masked_mean", "prototype_logits",
    "resize_logits", "resize_masks", "sigmoid_rampup", "softmax_mse", "world_size",
]

"""Per-epoch logging of every semi-supervised loss term, drawn into nnU-Net's progress.png.

nnU-Net's LocalLogger accepts only its eight predefined keys and plots three panels. This subclass
registers extra keys (one value per epoch, like nnU-Net's own) and draws more panels: the
unweighted loss terms with the supervised loss, the term weights λ(t), the time the network spent
waiting for labeled and unlabeled batches (in the epoch-time panel), the collapse diagnostics (per
foreground class, the share of the teacher's pseudo labels on unlabeled patches next to its share in
the labeled patches, with the teacher's mean confidence, the gate's kept fraction overall and per predicted
class, and the share of voxels where teacher and student argmax disagree; for single-network
methods such as MSPA the network's own predictions on the unlabeled patches), the gradient norms (the
weighted gradient of each term against the supervised one, probed on the first step of every epoch, and
the total norm before nnU-Net's clipping at 12) and the method's own diagnostics. Everything is stored
in the checkpoint's ``logging`` entry, so curves continue across ``--c`` resumes.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence

import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402

from nnunet_proto.training.compat import LocalLogger  # noqa: E402

PREFIX = "ssl_"
#: method diagnostics are logged as ``ssl_diag_<name>``
DIAG_PREFIX = PREFIX + "diag_"
#: collapse warning: a foreground class whose pseudo-label share is below COLLAPSE_RATIO × its labeled share ...
COLLAPSE_RATIO = 0.1
#: ... in each of the last COLLAPSE_EPOCHS epochs. Three epochs (750 steps with nnU-Net's 250 per epoch, 150 on
#: the 50-iteration CPU benchmark) ignore a single bad epoch but warn long before a run ends; each value is already
#: an average over all steps of its epoch. The labeled share is inflated by nnU-Net's foreground oversampling
#: (a third of the labeled patches are centred on foreground), which the factor 10 leaves room for.
COLLAPSE_EPOCHS = 3
#: nnU-Net clips the gradient norm of every step at this value (nnUNetTrainer.train_step)
CLIP_NORM = 12.0


def gradnorm_keys(term_names: Iterable[str]) -> List[str]:
    """Logged gradient norms: per term (weighted, as it acts), supervised, and the total before clipping."""
    return [PREFIX + "gradnorm_sup", *(f"{PREFIX}gradnorm_{t}" for t in term_names), PREFIX + "gradnorm_total"]


def collapse_keys(num_classes: int) -> List[str]:
    """Logger keys of the collapse diagnostics (``ops.pseudo_labels.collapse_diagnostic_names`` with PREFIX)."""
    from nnunet_proto.ops.pseudo_labels import collapse_diagnostic_names

    return [PREFIX + k for k in collapse_diagnostic_names(num_classes)] if num_classes > 0 else []


def partial_collapse_keys(num_classes: int) -> List[str]:
    """Collapse keys that are NaN in some steps by design (``ops.pseudo_labels.partial_collapse_names``): a class
    not predicted in a step has no kept share; the teacher-student disagreement may be measured on one step per
    epoch. Their epoch value is the mean over the steps that measured them (NaN if none did)."""
    from nnunet_proto.ops.pseudo_labels import partial_collapse_names

    return [PREFIX + k for k in partial_collapse_names(num_classes)] if num_classes > 0 else []


def class_names_from_dataset_json(dataset_json: dict) -> Dict[int, str]:
    """Segmentation output c -> its name in dataset.json (label-based datasets; regions have no single value)."""
    return {int(v): str(k) for k, v in dataset_json.get("labels", {}).items()
            if isinstance(v, int) and not isinstance(v, bool) and k != "ignore"}


def class_label(c: int, names: Dict[int, str]) -> str:
    """'class 1 (RV)' where dataset.json names the class, else 'class 1'."""
    return f"class {c} ({names[c]})" if c in names else f"class {c}"


def collapsing_classes(log: Dict[str, Sequence[float]], num_classes: int, epochs: int = COLLAPSE_EPOCHS,
                       ratio: float = COLLAPSE_RATIO) -> List[int]:
    """Foreground classes c whose logged pseudo-label share was < ratio × labeled share in each of the last
    ``epochs`` epochs (NaN epochs, e.g. without a teacher forward, break the run)."""
    out = []
    for c in range(1, num_classes):
        pl = list(log.get(f"{PREFIX}pl_share_c{c}", []))[-epochs:]
        lab = list(log.get(f"{PREFIX}labeled_share_c{c}", []))[-epochs:]
        if len(pl) < epochs or len(lab) < epochs:
            continue
        if all(math.isfinite(p) and math.isfinite(q) and q > 0 and p < ratio * q for p, q in zip(pl, lab)):
            out.append(c)
    return out


class SemiSupervisedLogger(LocalLogger):
    def __init__(self, term_names: Iterable[str], verbose: bool = False, num_classes: int = 0,
                 diagnostic_names: Iterable[str] = (), class_names: Optional[Dict[int, str]] = None):
        super().__init__(verbose)
        self.term_names = tuple(term_names)
        self.num_classes = int(num_classes)
        self.class_names = dict(class_names or {})
        self.diagnostic_names = tuple(diagnostic_names)
        for key in self.extra_keys():
            self.my_fantastic_logging[key] = []

    def extra_keys(self) -> List[str]:
        keys = [PREFIX + "loss_sup"]
        keys += [f"{PREFIX}loss_{t}" for t in self.term_names]
        keys += [f"{PREFIX}weight_{t}" for t in self.term_names]
        keys += [PREFIX + "wait_labeled_s", PREFIX + "wait_unlabeled_s"]
        keys += collapse_keys(self.num_classes)
        keys += gradnorm_keys(self.term_names)
        keys += [DIAG_PREFIX + d for d in self.diagnostic_names]
        return keys

    def load_checkpoint(self, checkpoint: dict) -> None:
        """Restore, filling extra keys a checkpoint lacks with NaN so every list keeps one entry per epoch."""
        super().load_checkpoint(checkpoint)
        n = len(self.my_fantastic_logging.get("train_losses", []))
        for key in self.extra_keys():
            if key not in self.my_fantastic_logging:
                self.my_fantastic_logging[key] = [math.nan] * n

    def plot_progress_png(self, output_folder: str) -> None:
        log = self.my_fantastic_logging
        epoch = min(len(v) for v in log.values()) - 1
        if epoch < 0:
            return
        x = list(range(epoch + 1))
        panels = 7 + bool(self.diagnostic_names)
        fig, axes = plt.subplots(panels, 1, figsize=(30, 16 * panels))
        plt.rcParams.update({"font.size": 24})

        # 1-3: nnU-Net's own panels (loss / pseudo Dice, epoch time, learning rate)
        ax = axes[0]
        ax2 = ax.twinx()
        ax.plot(x, log["train_losses"][:epoch + 1], color="b", label="loss_tr (total)", linewidth=4)
        ax.plot(x, log["val_losses"][:epoch + 1], color="r", label="loss_val", linewidth=4)
        ax2.plot(x, log["mean_fg_dice"][:epoch + 1], color="g", ls="dotted", label="pseudo dice", linewidth=3)
        ax2.plot(x, log["ema_fg_dice"][:epoch + 1], color="g", label="pseudo dice (mov. avg.)", linewidth=4)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax2.set_ylabel("pseudo dice")
        ax.legend(loc=(0, 1))
        ax2.legend(loc=(0.2, 1))

        ax = axes[1]
        durations = [e - s for s, e in zip(log["epoch_start_timestamps"][:epoch + 1],
                                           log["epoch_end_timestamps"][:epoch + 1])]
        ax.plot(x, durations, color="b", label="epoch duration", linewidth=4)
        ax.plot(x, log[PREFIX + "wait_labeled_s"][:epoch + 1], color="c", ls="--",
                label="waiting for labeled batches", linewidth=3)
        ax.plot(x, log[PREFIX + "wait_unlabeled_s"][:epoch + 1], color="m", ls="--",
                label="waiting for unlabeled batches", linewidth=3)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("epoch")
        ax.set_ylabel("time [s]")
        ax.legend(loc=(0, 1))

        ax = axes[2]
        ax.plot(x, log["lrs"][:epoch + 1], color="b", label="learning rate", linewidth=4)
        ax.set_xlabel("epoch")
        ax.set_ylabel("learning rate")
        ax.legend(loc=(0, 1))

        # 4: unweighted semi-supervised terms (left) and the supervised loss (right)
        ax = axes[3]
        ax2 = ax.twinx()
        for name in self.term_names:
            ax.plot(x, log[f"{PREFIX}loss_{name}"][:epoch + 1], label=f"{name} (unweighted)", linewidth=4)
        ax2.plot(x, log[PREFIX + "loss_sup"][:epoch + 1], color="k", ls="--", label="supervised (nnU-Net loss)",
                 linewidth=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel("semi-supervised loss terms")
        ax2.set_ylabel("supervised loss")
        ax.legend(loc=(0, 1))
        ax2.legend(loc=(0.5, 1))

        # 5: weights of the terms (ramp-ups)
        ax = axes[4]
        for name in self.term_names:
            ax.plot(x, log[f"{PREFIX}weight_{name}"][:epoch + 1], label=f"weight of {name}", linewidth=4)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss weight")
        ax.legend(loc=(0, 1))

        # 6: collapse diagnostics: per foreground class, pseudo-label share (solid) vs labeled share (dashed),
        # share among the gate's kept voxels (dotted), teacher-student disagreement (black dash-dot); background
        # shares, teacher confidence, kept fraction and each class' kept share (dash-dot) on the right axis
        ax = axes[5]
        ax2 = ax.twinx()
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for c in range(1, self.num_classes):
            col = colors[(c - 1) % len(colors)]
            name = class_label(c, self.class_names)
            ax.plot(x, log[f"{PREFIX}pl_share_c{c}"][:epoch + 1], color=col, linewidth=4,
                    label=f"{name}: pseudo labels (unlabeled)")
            ax.plot(x, log[f"{PREFIX}pl_share_kept_c{c}"][:epoch + 1], color=col, ls="dotted", linewidth=3,
                    label=f"{name}: kept pseudo labels")
            ax.plot(x, log[f"{PREFIX}labeled_share_c{c}"][:epoch + 1], color=col, ls="--", linewidth=3,
                    label=f"{name}: labeled patches")
            ax2.plot(x, log[f"{PREFIX}pl_kept_c{c}"][:epoch + 1], color=col, ls="dashdot", linewidth=3,
                     label=f"{name}: share kept by the gate (right axis)")
        if self.num_classes:  # background on the right axis: its share (~0.9) would flatten the others
            ax2.plot(x, log[f"{PREFIX}pl_share_c0"][:epoch + 1], color="tab:brown", linewidth=3,
                     label="background: pseudo labels (right axis)")
            ax2.plot(x, log[f"{PREFIX}pl_share_kept_c0"][:epoch + 1], color="tab:brown", ls="dotted", linewidth=3,
                     label="background: kept pseudo labels (right axis)")
            ax2.plot(x, log[f"{PREFIX}labeled_share_c0"][:epoch + 1], color="tab:brown", ls="--", linewidth=3,
                     label="background: labeled patches (right axis)")
            ax2.plot(x, log[f"{PREFIX}pl_kept_c0"][:epoch + 1], color="tab:brown", ls="dashdot", linewidth=3,
                     label="background: share kept by the gate (right axis)")
            # a voxel share like the class shares (left axis, small values): 0 = the teacher is a copy of the student
            ax.plot(x, log[PREFIX + "teacher_disagreement"][:epoch + 1], color="k", ls="dashdot", linewidth=4,
                    label="teacher-student argmax disagreement (unlabeled voxels)")
            ax2.plot(x, log[PREFIX + "pl_confidence"][:epoch + 1], color="k", linewidth=3,
                     label="mean confidence of the pseudo-label source")
            ax2.plot(x, log[PREFIX + "pl_kept"][:epoch + 1], color="grey", ls="--", linewidth=3,
                     label="kept by the gate")
        ax.set_ylim(bottom=0)
        ax2.set_ylim(0, 1.05)
        ax.set_xlabel("epoch")
        ax.set_ylabel("voxel share of foreground class / teacher-student disagreement")
        ax2.set_ylabel("background share / confidence / kept fraction (overall, per class)")
        handles, names = ax.get_legend_handles_labels()
        handles2, names2 = ax2.get_legend_handles_labels()
        if handles or handles2:  # one legend for both axes (two would overlap above the panel)
            ax.legend(handles + handles2, names + names2, loc=(0, 1), ncol=3)

        # 7: gradient norms (log scale): which term drives the network, and how often nnU-Net's clipping bites
        ax = axes[6]
        ax.plot(x, log[PREFIX + "gradnorm_sup"][:epoch + 1], color="k", ls="--", linewidth=3,
                label="supervised (probe, first step of the epoch)")
        for name in self.term_names:
            ax.plot(x, log[f"{PREFIX}gradnorm_{name}"][:epoch + 1], linewidth=4, label=f"weight x {name} (probe)")
        ax.plot(x, log[PREFIX + "gradnorm_total"][:epoch + 1], color="grey", linewidth=3,
                label="total before clipping (epoch mean)")
        ax.axhline(CLIP_NORM, color="r", ls="dotted", linewidth=2, label=f"nnU-Net's clipping norm {CLIP_NORM:g}")
        if any(v > 0 for k in gradnorm_keys(self.term_names) for v in log[k][:epoch + 1] if v == v):
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("gradient norm")
        ax.legend(loc=(0, 1), ncol=3)

        # 8: the method's own diagnostics
        if self.diagnostic_names:
            ax = axes[7]
            for name in self.diagnostic_names:
                ax.plot(x, log[DIAG_PREFIX + name][:epoch + 1], label=name, linewidth=4)
            ax.set_xlabel("epoch")
            ax.set_ylabel("method diagnostics")
            ax.legend(loc=(0, 1), ncol=3)

        plt.tight_layout()
        fig.savefig(f"{output_folder}/progress.png")
        plt.close(fig)

"""Per-epoch logging of every semi-supervised loss term, drawn into nnU-Net's progress.png.

nnU-Net's LocalLogger accepts only its eight predefined keys and plots three panels. This subclass
registers extra keys (one value per epoch, like nnU-Net's own) and draws two more panels: the
unweighted loss terms with the supervised loss, and the term weights λ(t) together with the time
the network spent waiting for labeled and unlabeled batches. Everything is stored in the
checkpoint's ``logging`` entry, so curves continue across ``--c`` resumes.
"""
from __future__ import annotations

import math
from typing import Iterable, List

import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402

from nnunet_proto.training.compat import LocalLogger  # noqa: E402

PREFIX = "ssl_"


class SemiSupervisedLogger(LocalLogger):
    def __init__(self, term_names: Iterable[str], verbose: bool = False):
        super().__init__(verbose)
        self.term_names = tuple(term_names)
        for key in self.extra_keys():
            self.my_fantastic_logging[key] = []

    def extra_keys(self) -> List[str]:
        keys = [PREFIX + "loss_sup"]
        keys += [f"{PREFIX}loss_{t}" for t in self.term_names]
        keys += [f"{PREFIX}weight_{t}" for t in self.term_names]
        keys += [PREFIX + "wait_labeled_s", PREFIX + "wait_unlabeled_s"]
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
        fig, axes = plt.subplots(5, 1, figsize=(30, 80))
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

        plt.tight_layout()
        fig.savefig(f"{output_folder}/progress.png")
        plt.close(fig)

"""What a benchmark runs: the spec (saved beside the results so that a resumed run can be checked) and runs."""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

PLAIN = "nnUNetTrainer"
# A/A control: the semi-supervised base trainer's whole path with every semi-supervised weight at 0. It must
# match plain nnU-Net within the bootstrap CI; if it does not, the shared glue has a defect.
CONTROL = "nnUNetTrainerZeroSSL"
SPEC_FILE = "benchmark_spec.json"
# files a run folder holds once every stage (train, validate, predict, evaluate, postprocess) is done
RUN_DONE_FILES = ("metrics.json", "postprocessing.json")


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark: every trainer x labeled amount x seed, trained on the same label-scarce folds.

    The budget (epochs x iterations) is the same for every trainer, including plain nnU-Net. The
    checkpoint that is evaluated is ``checkpoint`` ("final", or "best" = nnU-Net's checkpoint_best,
    chosen on the validation cases of the fold), never one chosen on the test set.
    """

    dataset: str
    configuration: str
    plans: str
    trainers: Tuple[str, ...]
    amounts: Tuple[str, ...]
    seeds: Tuple[int, ...]
    test_images: str
    test_labels: str
    epochs: int
    iterations_per_epoch: int
    val_iterations_per_epoch: int = 10
    group_regex: Optional[str] = None
    base_fold: int = 0
    device: str = "cpu"
    checkpoint: str = "final"
    run_validation: bool = True
    test_time_mirroring: bool = True  # nnU-Net's default; off = nnUNetv2_predict --disable_tta (cheaper on CPU)
    control: Optional[str] = CONTROL  # A/A control trainer run next to plain; None = none (--no-control)
    precision: str = "fp32"  # CPU training precision of every run: fp32, or bf16 autocast (specs without it: fp32)
    labels: Optional[Tuple[int, ...]] = None
    name: str = "benchmark"
    notes: str = ""
    save_every: int = 1  # checkpoint_latest every epoch: an interrupted run loses at most one epoch
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ValueError(f"benchmark name {self.name!r} must be letters, digits, '_', '.' or '-'")
        if self.checkpoint not in ("final", "best"):
            raise ValueError(f"checkpoint must be 'final' or 'best' (chosen on validation cases), got "
                             f"{self.checkpoint!r}; test-set selection is not offered")
        if self.epochs < 1 or self.iterations_per_epoch < 1 or self.val_iterations_per_epoch < 1:
            raise ValueError("epochs, iterations_per_epoch and val_iterations_per_epoch must be >= 1")
        if not self.amounts or not self.seeds:
            raise ValueError("give at least one labeled amount and one seed")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16' (CPU bfloat16 autocast), got {self.precision!r}")
        if self.precision == "bf16" and not self.device.startswith("cpu"):
            raise ValueError(f"precision 'bf16' is CPU autocast; on {self.device!r} nnU-Net trains with its own fp16 "
                             f"AMP, so leave precision at 'fp32'")
        bad = [t for t in self.trainers if "__" in t]
        if bad:
            raise ValueError(f"trainer names must not contain '__': {bad}")

    @property
    def all_trainers(self) -> Tuple[str, ...]:
        """Plain nnU-Net first, always included, then the A/A control (unless disabled), then the trainers."""
        first = (PLAIN,) + ((self.control,) if self.control and self.control != PLAIN else ())
        return first + tuple(t for t in self.trainers if t not in first)

    def budget_key(self) -> dict:
        """Fields that must not change when a benchmark is resumed."""
        return {k: getattr(self, k) for k in ("dataset", "configuration", "plans", "epochs", "iterations_per_epoch",
                                                  "val_iterations_per_epoch", "group_regex", "base_fold", "checkpoint",
                                                  "test_time_mirroring", "precision")}

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "BenchmarkSpec":
        d = json.loads(text)
        # a spec written before the A/A control existed: keep its behaviour (no control run) on resume
        d.setdefault("control", None)
        for k in ("trainers", "amounts", "seeds", "labels"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)


@dataclass(frozen=True)
class Run:
    trainer: str
    amount: str
    seed: int
    fold: int

    @property
    def tag(self) -> str:
        amount = self.amount.replace("%", "pct")
        return f"{self.trainer}/labeled{amount}_seed{self.seed}"

    def dir(self, runs_root: Path) -> Path:
        return runs_root / self.tag


def run_finished(run_dir: Path) -> bool:
    """Every stage of a run is done (a run finished by older code without postprocessing is not)."""
    return all((run_dir / f).is_file() for f in RUN_DONE_FILES)


def load_runs(path: Path) -> List[Run]:
    return [Run(**r) for r in json.loads(path.read_text())]

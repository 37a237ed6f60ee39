"""What a benchmark runs: the spec (saved beside the results so that a resumed run can be checked) and runs."""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, List, Optional, Tuple

PLAIN = "nnUNetTrainer"
# A/A control: the semi-supervised base trainer's whole path with every semi-supervised weight at 0. It must
# match plain nnU-Net within the bootstrap CI; if it does not, the shared glue has a defect.
CONTROL = "nnUNetTrainerZeroSSL"
#: the offline self-training row (--self-training): its teacher is the plain run of the same fold and seed
SELF_TRAINING = "nnUNetTrainerSelfTraining"
#: row-name suffixes: a plain run trained for more steps (equal compute) and a run's EMA teacher evaluated
STEPS_MARK = "@x"
TEACHER_MARK = "@teacher"
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
    # plain nnU-Net again for equal_compute x the steps (the s/step ratio of the most expensive trainer of the
    # comparison, rounded; equal_compute_source says which measurement); None = no such row
    equal_compute: Optional[float] = None
    equal_compute_source: str = ""
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
        bad = [t for t in self.trainers if "__" in t or "@" in t]
        if bad:
            raise ValueError(f"trainer names must not contain '__' or '@': {bad}")
        if self.equal_compute is not None and not 1.0 < self.equal_compute <= 20.0:
            raise ValueError(f"equal_compute is the factor of plain nnU-Net's steps, in (1, 20], got "
                             f"{self.equal_compute}")
        if self.equal_compute is not None and not self.equal_compute_source.strip():
            raise ValueError("say where the equal-compute factor comes from (--equal-compute-source, e.g. "
                             "'nnUNetTrainerPCCS bf16, docs/benchmarks/timing_acdc_2d_cpu.md'): the report records it")
        later = [t for t in self.trainers if is_self_training(t) and "_round" in t]
        if later:
            raise ValueError(f"{later}: the benchmark runs self-training round 1 only (its teacher is the plain run "
                             f"of the same fold); run later rounds with nnunet_proto self-train")

    @property
    def all_trainers(self) -> Tuple[str, ...]:
        """Plain nnU-Net first, always included, then the A/A control (unless disabled), then the trainers."""
        first = (PLAIN,) + ((self.control,) if self.control and self.control != PLAIN else ())
        return first + tuple(t for t in self.trainers if t not in first)

    def runs_of(self, amount: str, seed: int, fold: int, needs_plain: Collection[str] = ()) -> List["Run"]:
        """The runs of one label-scarce fold in execution order: plain first, then the runs that need its
        checkpoint (self-training students, whose teacher it is, and ``needs_plain``: the warm-started trainers),
        then the other trainers in the order given (the A/A control first), then plain at equal compute.

        Plain's dependents come straight after it because its checkpoint does not travel with ``--export-runs``:
        on a machine that is not kept, a dependent started in a later session than plain would be refused."""
        first, *rest = self.all_trainers
        dependent = [t for t in rest if is_self_training(t) or t in needs_plain]
        order = [first] + dependent + [t for t in rest if t not in dependent]
        runs = [Run(t, amount, seed, fold) for t in order]
        if self.equal_compute is not None:
            runs.append(Run(PLAIN, amount, seed, fold, steps_factor=self.equal_compute))
        return runs

    def budget_key(self) -> dict:
        """Fields that must not change when a benchmark is resumed."""
        return {k: getattr(self, k) for k in ("dataset", "configuration", "plans", "epochs", "iterations_per_epoch",
                                                  "val_iterations_per_epoch", "group_regex", "base_fold", "checkpoint",
                                                  "test_time_mirroring", "precision")}

    def budget_differences(self, other: "BenchmarkSpec") -> dict:
        """{field: (self's value, other's value)} for every ``budget_key`` field that differs; -d 27 and -d
        Dataset027_ACDC are the same dataset."""
        from nnunet_proto.training.compat import maybe_convert_to_dataset_name

        a, b = ({**x.budget_key(), "dataset": maybe_convert_to_dataset_name(x.dataset)} for x in (self, other))
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "BenchmarkSpec":
        d = json.loads(text)
        # a spec written before the A/A control existed: keep its behaviour (no control run) on resume
        d.setdefault("control", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"the saved benchmark spec has fields this version does not know: {unknown} (written "
                             f"by a newer nnunet_proto?)")
        for k in ("trainers", "amounts", "seeds", "labels"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)


def is_self_training(trainer: str) -> bool:
    """Whether ``trainer`` is an offline self-training student (it needs a teacher run's pseudo labels)."""
    return trainer.startswith(SELF_TRAINING)


def steps_row(trainer: str, factor: float) -> str:
    """Row name of ``trainer`` trained for ``factor`` x the benchmark's steps (``nnUNetTrainer@x2.3``)."""
    return f"{trainer}{STEPS_MARK}{factor:g}"


def teacher_row(row: str) -> str:
    """Row name of a run's EMA teacher (``nnUNetTrainerCPCL@teacher``)."""
    return row + TEACHER_MARK


@dataclass(frozen=True)
class Run:
    trainer: str
    amount: str
    seed: int
    fold: int
    steps_factor: float = 1.0  # > 1: the equal-compute row (trained for steps_factor x the spec's steps)

    @property
    def row(self) -> str:
        """The report row: the trainer, or ``<trainer>@x<factor>`` for a run with more steps."""
        return self.trainer if self.steps_factor == 1.0 else steps_row(self.trainer, self.steps_factor)

    @property
    def tag(self) -> str:
        amount = self.amount.replace("%", "pct")
        return f"{self.row}/labeled{amount}_seed{self.seed}"

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        if self.steps_factor == 1.0:  # runs.json as older versions wrote it
            d.pop("steps_factor")
        return d

    def dir(self, runs_root: Path) -> Path:
        return runs_root / self.tag


#: written once a teacher-student run's EMA teacher is evaluated too (its own report row)
TEACHER_DONE_FILE = "teacher.json"
TEACHER_CHECKPOINT = "checkpoint_final_teacher.pth"


def run_finished(run_dir: Path) -> bool:
    """Every stage of a run is done (a run finished by older code without postprocessing is not; a teacher-student
    run also needs its EMA teacher's evaluation)."""
    if not all((run_dir / f).is_file() for f in RUN_DONE_FILES):
        return False
    info = run_dir / "run_info.json"
    if info.is_file() and not (run_dir / TEACHER_DONE_FILE).is_file():
        folder = json.loads(info.read_text()).get("output_folder")
        if folder and (Path(folder) / TEACHER_CHECKPOINT).is_file():
            return False
    return True


def load_runs(path: Path) -> List[Run]:
    return [Run(**r) for r in json.loads(path.read_text())]


def record_started(runs_file: Path, run: Run) -> None:
    """Add ``run`` to runs.json (once); called when the run starts, so runs that never started are not listed."""
    known = load_runs(runs_file) if runs_file.is_file() else []
    if run not in known:
        tmp = runs_file.with_suffix(".tmp")
        tmp.write_text(json.dumps([r.to_json() for r in known + [run]], indent=2))
        os.replace(tmp, runs_file)

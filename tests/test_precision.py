"""Opt-in CPU bfloat16 autocast (plain and every semi-supervised trainer), float32 method maths, OOM advice,
and the benchmark's recorded precision."""
import json

import numpy as np
import pytest
import torch
from conftest import build_trainer, semi_supervised_trainer_names

from nnunet_proto.benchmark.spec import SPEC_FILE, BenchmarkSpec
from nnunet_proto.training.compat import unwrap_network
from nnunet_proto.training.precision import (
    PRECISION_ENV,
    cpu_bf16_supported,
    cpu_precision,
    float32_fields,
    to_float32,
)
from nnunet_proto.training.progress import partial_collapse_keys

TRAINERS = semi_supervised_trainer_names()


def test_precision_setting_is_validated(monkeypatch):
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    assert cpu_precision() == "fp32"
    monkeypatch.setenv(PRECISION_ENV, "BF16")
    assert cpu_precision() == "bf16"
    monkeypatch.setenv(PRECISION_ENV, "fp16")
    with pytest.raises(ValueError, match=PRECISION_ENV):
        cpu_precision()


def test_float32_fields_casts_tensors_only():
    from nnunet_proto.methods.base import StepInputs

    x = StepInputs(num_classes=2, ignore_index=None, target_l=torch.zeros(1, 1, 2, 2, dtype=torch.long),
                   logits_l=torch.zeros(1, 2, 2, 2, dtype=torch.bfloat16),
                   features={"decoder": torch.zeros(1, 3, 2, 2, dtype=torch.float16)}, modules=torch.nn.Linear(1, 1))
    y = float32_fields(x)
    assert y.logits_l.dtype == torch.float32 and y.features["decoder"].dtype == torch.float32
    assert y.target_l.dtype == torch.long and y.modules is x.modules and y.num_classes == 2
    assert to_float32((torch.ones(1, dtype=torch.half), 3))[0].dtype == torch.float32


def _output_dtypes(trainer):
    seen = []
    head = unwrap_network(trainer.network).decoder.seg_layers[-1]
    handle = head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    return seen, handle


@pytest.mark.parametrize("name", ["nnUNetTrainer_cpubf16"] + TRAINERS)
def test_bf16_switch_takes_bf16_steps(name, synthetic_dataset, fresh_results, monkeypatch):
    monkeypatch.setenv(PRECISION_ENV, "bf16")
    trainer = build_trainer(name, synthetic_dataset, "2d")
    trainer.num_epochs, trainer.num_iterations_per_epoch = 1, 2
    trainer.on_train_start()
    try:
        seen, handle = _output_dtypes(trainer)
        captured = {}
        if hasattr(trainer, "combine"):
            combine = trainer.combine

            def spy(sup, terms):
                captured.update(terms)
                return combine(sup, terms)

            trainer.combine = spy
        before = [p.detach().clone() for p in trainer.network.parameters()]
        for _ in range(2):
            out = trainer.train_step(next(trainer.dataloader_train))
            # pl_kept_c<k> (class not predicted) and teacher_disagreement (not measured in this step) are NaN by design
            partial = set(partial_collapse_keys(trainer.label_manager.num_segmentation_heads))
            assert np.isfinite(out["loss"]) and all(np.isfinite(v) for k, v in out.items() if k not in partial)
        handle.remove()
        assert seen and all(d == torch.bfloat16 for d in seen), f"network output dtypes {seen}"
        assert all(p.dtype == torch.float32 for p in trainer.network.parameters())  # weights stay fp32
        assert any(not torch.equal(a, b) for a, b in zip(before, trainer.network.parameters()))
        for term, value in captured.items():  # method maths in float32 whatever the autocast
            assert value.dtype == torch.float32 and torch.isfinite(value), term
    finally:
        trainer.disable_checkpointing = True
        trainer.on_train_end()


def test_default_steps_stay_fp32(synthetic_dataset, fresh_results, monkeypatch):
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    trainer = build_trainer("nnUNetTrainerCPCL", synthetic_dataset, "2d")
    trainer.num_epochs, trainer.num_iterations_per_epoch = 1, 1
    trainer.on_train_start()
    try:
        seen, handle = _output_dtypes(trainer)
        trainer.train_step(next(trainer.dataloader_train))
        handle.remove()
        assert seen == [torch.float32]
    finally:
        trainer.disable_checkpointing = True
        trainer.on_train_end()


def test_first_step_oom_prints_advice(synthetic_dataset, fresh_results):
    trainer = build_trainer("nnUNetTrainerCPCL", synthetic_dataset, "2d")
    trainer.num_epochs, trainer.num_iterations_per_epoch = 1, 1

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    trainer.compute_loss = oom
    try:
        with pytest.raises(torch.cuda.OutOfMemoryError, match="unlabeled_batch_size") as info:
            trainer.run_training()
        assert "gpu_memory_target" in str(info.value) and "Tried to allocate" in str(info.value)
        log = open(trainer.log_file).read()
        assert "ran out of GPU memory in its first training step" in log
    finally:
        from nnunet_proto.training.base_trainer import _finish

        _finish(trainer.dataloader_unlabeled)
        trainer.dataloader_train = getattr(trainer.dataloader_train, "loader", trainer.dataloader_train)
        for loader in (trainer.dataloader_train, trainer.dataloader_val):
            _finish(loader)


# ------------------------------------------------------------------------------------------- benchmark
def _spec(ds, **changes):
    base = dict(dataset=str(ds.id), configuration="2d", plans=ds.plans, trainers=("nnUNetTrainerCPCL",),
                amounts=("3",), seeds=(0,), test_images=str(ds.raw / "imagesTs"),
                test_labels=str(ds.raw / "labelsTs"), epochs=1, iterations_per_epoch=1, val_iterations_per_epoch=1,
                run_validation=False, test_time_mirroring=False)
    base.update(changes)
    return BenchmarkSpec(**base)


def test_benchmark_records_precision_and_refuses_a_change(synthetic_dataset, tmp_path):
    from nnunet_proto.benchmark.runner import prepare

    root = tmp_path / "bench"
    prepare(_spec(synthetic_dataset, precision="bf16"), root)
    assert json.loads((root / SPEC_FILE).read_text())["precision"] == "bf16"
    with pytest.raises(ValueError, match="precision"):
        prepare(_spec(synthetic_dataset), root)
    with pytest.raises(ValueError, match="CPU autocast"):
        _spec(synthetic_dataset, precision="bf16", device="cuda")

    # a spec written before the precision option existed loads as fp32 and still resumes as fp32
    old = json.loads(_spec(synthetic_dataset).to_json())
    del old["precision"]
    (root / SPEC_FILE).write_text(json.dumps(old))
    assert BenchmarkSpec.from_json((root / SPEC_FILE).read_text()).precision == "fp32"
    prepare(_spec(synthetic_dataset), root)


@pytest.mark.parametrize("name", ["nnUNetTrainer", "nnUNetTrainerCPCL"])
def test_benchmark_run_trains_in_bf16(name, synthetic_dataset, fresh_results, tmp_path, monkeypatch):
    from nnunet_proto.benchmark.run_one import train

    monkeypatch.delenv(PRECISION_ENV, raising=False)
    monkeypatch.setenv(PRECISION_ENV, "fp32")  # run_one must override it from the spec
    info = train(_spec(synthetic_dataset, precision="bf16"), name, synthetic_dataset.fold, 0, torch.device("cpu"))
    folder = info["output_folder"]
    assert ("nnUNetTrainer_cpubf16__" in folder) == (name == "nnUNetTrainer")
    logs = "".join(open(p).read() for p in sorted(__import__("glob").glob(f"{folder}/training_log_*.txt")))
    assert "CPU bfloat16 autocast is on" in logs
    ckpt = torch.load(f"{folder}/checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert all(np.isfinite(v) for v in ckpt["logging"]["train_losses"])
    # the warning for a CPU without bf16 kernels appears exactly where this machine has none
    assert ("WARNING: CPU bfloat16 autocast is on, but this CPU has no native bfloat16" in logs) \
        == (not cpu_bf16_supported())


def test_bf16_benchmark_refused_on_a_cpu_without_bf16_kernels(synthetic_dataset, fresh_results, monkeypatch,
                                                               capsys):
    import nnunet_proto.training.precision as precision
    from nnunet_proto.cli import main

    argv = ["benchmark", "-d", str(synthetic_dataset.id), "-c", "2d", "-p", synthetic_dataset.plans,
            "-tr", "nnUNetTrainerCPCL", "--labeled", "3", "--seeds", "0", "--epochs", "1", "--iterations", "1",
            "--no-validation", "--disable-tta", "--no-control", "--precision", "bf16", "--name", "slowbf16",
            "--device", "cpu"]
    results = fresh_results / "nnunet_proto_benchmarks" / "slowbf16"
    monkeypatch.setattr(precision, "cpu_bf16_supported", lambda: False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no native bfloat16 support" in err and "--precision fp32" in err and "--allow-slow-bf16" in err
    assert not results.exists()  # refused before anything was written

    # the check itself: only bf16 on a CPU without kernels, and --allow-slow-bf16 turns it into a warning
    from nnunet_proto.cli import _check_cpu_bf16

    _check_cpu_bf16("fp32", "cpu", False)
    _check_cpu_bf16("bf16", "cuda", False)
    _check_cpu_bf16("bf16", "cpu", True)
    assert "WARNING: --precision bf16" in capsys.readouterr().err
    monkeypatch.setattr(precision, "cpu_bf16_supported", lambda: True)
    _check_cpu_bf16("bf16", "cpu", False)


def test_slow_bf16_warning_in_the_trainer_log(monkeypatch):
    import nnunet_proto.training.precision as precision

    logged = []
    monkeypatch.setattr(precision, "cpu_bf16_supported", lambda: False)
    precision.log_cpu_bf16(torch.device("cpu"), "bf16", logged.append, "weights")
    precision.log_cpu_bf16(torch.device("cpu"), "fp32", logged.append, "weights")
    assert logged[0] == "CPU bfloat16 autocast is on (forward passes and losses in bf16; weights in fp32)"
    warnings = [m for m in logged if m.startswith("WARNING")]
    assert len(logged) == 2 and len(warnings) == 1
    assert "10.5x slower than fp32" in warnings[0] and "=fp32" in warnings[0]
    monkeypatch.setattr(precision, "cpu_bf16_supported", lambda: True)
    precision.log_cpu_bf16(torch.device("cpu"), "bf16", logged.append, "weights")
    assert len(logged) == 3 and not logged[2].startswith("WARNING")

"""Numerical precision of a training step: opt-in bfloat16 autocast on CPU, fp32 method maths, OOM advice.

nnU-Net autocasts to float16 on CUDA (with a GradScaler) and never autocasts on CPU. On a CPU with bf16
instructions (AVX512-BF16 / AMX) a plain nnU-Net step runs about 1.6-1.8x faster under bf16 autocast, so
CPU runs may opt in, for plain nnU-Net and every semi-supervised trainer alike:

* an environment variable, ``NNUNET_PROTO_CPU_PRECISION=bf16`` (default ``fp32``), read by the
  semi-supervised base trainer. It is an environment variable, like ``nnUNet_compile``, because it
  changes how the step is executed, not what is optimised; nnU-Net's trainer constructor takes no extra
  arguments, and a trainer-name suffix would double every trainer and results folder name;
* plain nnU-Net cannot read our variable, so ``nnUNetTrainer_cpubf16`` (trainers/) is plain
  ``nnUNetTrainer`` with the same autocast (the benchmark runs it as the plain baseline when its spec
  says ``precision: bf16``).

Both wrap the forward pass and loss (and nothing else) in ``torch.autocast("cpu", dtype=torch.bfloat16)``;
weights, optimiser state and gradients stay float32, and no GradScaler is needed (bf16 has fp32's
exponent range). The methods' own maths always runs in float32 (:func:`float32_math`), whatever the
autocast.

Without those instructions (e.g. an AVX2-only CPU) bf16 autocast is not faster but much slower: oneDNN has no
bf16 kernels there and PyTorch falls back to reference code (a plain ACDC 2D step measured 10.5x slower than fp32
on a 2-core AVX2 EPYC, docs/benchmarks/timing_acdc_2d_cpu.md). :func:`cpu_bf16_supported` tells; the trainers
log a warning and ``nnunet_proto benchmark --precision bf16`` refuses to start there unless told to.
"""
from __future__ import annotations

import dataclasses
import os
from contextlib import nullcontext
from typing import Any, ClassVar, Optional

import torch

PRECISION_ENV = "NNUNET_PROTO_CPU_PRECISION"
PRECISIONS = ("fp32", "bf16")


def cpu_precision(value: Optional[str] = None) -> str:
    """The CPU training precision: ``value``, else ``$NNUNET_PROTO_CPU_PRECISION``, else ``"fp32"``."""
    value = value if value is not None else os.environ.get(PRECISION_ENV, "fp32")
    value = value.strip().lower() or "fp32"
    if value not in PRECISIONS:
        raise ValueError(f"{PRECISION_ENV}={value!r} is not a precision; use one of {PRECISIONS} (bf16 = bfloat16 "
                         f"autocast for CPU training, opt-in)")
    return value


def cpu_bf16_supported() -> bool:
    """Whether this CPU has native bfloat16 kernels (oneDNN's bf16 check: AVX512-BF16/AMX, or AVX512 on x86)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: no fast bf16 path either
        return False


def slow_cpu_bf16_message() -> str:
    """Why CPU bf16 autocast is a bad idea on this machine, and what to do instead (one line)."""
    return (f"this CPU has no native bfloat16 support (torch CPU capability {torch.backends.cpu.get_cpu_capability()},"
            f" oneDNN bf16 unsupported), so bf16 autocast runs on slow reference kernels: a plain nnU-Net ACDC 2D step "
            f"measured 10.5x slower than fp32 on such a CPU (docs/benchmarks/timing_acdc_2d_cpu.md). Train in fp32 "
            f"({PRECISION_ENV}=fp32, plain nnUNetTrainer instead of nnUNetTrainer_cpubf16)")


def log_cpu_bf16(device: torch.device, precision: str, log, kept_fp32: str) -> None:
    """When bf16 autocast is on for a CPU: say so (``kept_fp32``: what stays float32), and warn with
    :func:`slow_cpu_bf16_message` on a CPU without bf16 kernels."""
    if device.type == "cpu" and precision == "bf16":
        log(f"CPU bfloat16 autocast is on (forward passes and losses in bf16; {kept_fp32} in fp32)")
        if not cpu_bf16_supported():
            log("WARNING: CPU bfloat16 autocast is on, but " + slow_cpu_bf16_message())


def step_autocast(device: torch.device, precision: str):
    """Autocast context of a training step's forward pass and loss.

    CUDA: float16, as nnU-Net does (its GradScaler handles the backward). CPU: bfloat16 when
    ``precision == "bf16"``, otherwise none (nnU-Net's CPU behaviour). Other devices: none.
    """
    if device.type == "cuda":
        return torch.autocast("cuda", enabled=True)
    if device.type == "cpu" and precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def float32_math(device_type: str):
    """Autocast off for ``device_type``: tensors created inside keep the dtype of their (float32) inputs.

    Use with :func:`to_float32` on the inputs, e.g. around a method's loss terms: under CUDA fp16 autocast
    a matmul of unnormalised 128³-voxel feature sums or an ``exp`` of a logit scaled by 1/τ = 20 would
    overflow float16 (largest finite value 65504).
    """
    return torch.autocast(device_type=device_type, enabled=False)


def to_float32(value: Any) -> Any:
    """``value`` with every floating-point tensor (also inside lists, tuples and dicts) cast to float32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() and value.dtype != torch.float32 else value
    if isinstance(value, dict):
        return {k: to_float32(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # NamedTuple
        return type(value)(*(to_float32(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(to_float32(v) for v in value)
    return value


def float32_fields(inputs: Any) -> Any:
    """A copy of a dataclass (e.g. a method's ``StepInputs``) whose tensor fields are float32 (others shared)."""
    changes = {f.name: to_float32(getattr(inputs, f.name)) for f in dataclasses.fields(inputs)
               if isinstance(getattr(inputs, f.name), (torch.Tensor, dict, list, tuple))}
    return dataclasses.replace(inputs, **changes)


def out_of_memory_advice(trainer_name: str, batch_size: int, unlabeled_batch_size: Optional[int],
                         configuration: str) -> str:
    """What to change when a (semi-supervised) step runs out of GPU memory, as one message."""
    if unlabeled_batch_size is None:  # plain nnU-Net
        return ""
    return (
        f"{trainer_name} ran out of GPU memory in its first training step. A semi-supervised step holds the "
        f"activations of {batch_size} labeled + {unlabeled_batch_size} unlabeled patches plus a teacher forward "
        f"pass, i.e. up to about 2x the memory nnU-Net sized the plan '{configuration}' for (measured ratios: "
        f"README, 'Running on a GPU'). Either lower the unlabeled batch in a trainer variant "
        f"(config = {trainer_name.split('_')[0]}.config.replace(unlabeled_batch_size=1), see 'Changing "
        f"hyperparameters' in the README), or plan for a smaller GPU so that the labeled batch shrinks too: "
        f"nnUNetv2_plan_experiment -d ID -gpu_memory_target 6 -overwrite_plans_name nnUNetPlans_6G, then "
        f"preprocess and train with -p nnUNetPlans_6G (for a 10-12 GB GPU).")


class CPUAutocastMixin:
    """Mixin for nnU-Net trainers: the whole ``train_step`` under bfloat16 autocast on CPU when enabled.

    ``forced_cpu_precision`` fixes the precision for a class (``nnUNetTrainer_cpubf16``); otherwise
    ``$NNUNET_PROTO_CPU_PRECISION`` decides. Put it before ``nnUNetTrainer`` in the bases.
    """

    forced_cpu_precision: ClassVar[Optional[str]] = None

    @property
    def cpu_precision(self) -> str:
        return cpu_precision(self.forced_cpu_precision)

    def on_train_start(self):
        super().on_train_start()
        log_cpu_bf16(self.device, self.cpu_precision, self.print_to_log_file, "weights and optimiser")

    def train_step(self, batch: dict) -> dict:
        with step_autocast(self.device, self.cpu_precision) if self.device.type == "cpu" else nullcontext():
            return super().train_step(batch)

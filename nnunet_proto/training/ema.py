"""EMA teacher: an exponential moving average of the student's parameters and buffers."""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from nnunet_proto.ops.schedules import ema_decay


class EMATeacher:
    """θ_T ← α θ_T + (1 − α) θ_S after every optimiser step (docs/methods/README.md, 'EMA teacher').

    * created from the *unwrapped* student (no DDP / compile wrapper), after pretrained weights are
      loaded; every DDP rank holds an identical copy because DDP keeps the students identical;
    * floating-point buffers (BatchNorm running statistics) are averaged too, integer buffers copied;
    * kept in eval mode with ``requires_grad=False``; it never receives gradient.
    """

    def __init__(self, student: nn.Module, decay: float = 0.99, warmup: bool = True):
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.module = copy.deepcopy(student)
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        # tensor lists built once: walking the module tree each step costs milliseconds on small networks
        # (load_state_dict copies in place, so the tensors stay the same objects)
        self._t_params = list(self.module.parameters())
        self._t_buffers = list(self.module.buffers())
        self._student: Optional[nn.Module] = None
        self._s_params: List[torch.Tensor] = []
        self._s_buffers: List[torch.Tensor] = []

    def _student_tensors(self, student: nn.Module) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        if student is not self._student:
            s_params = [p.detach() for p in student.parameters()]
            if len(s_params) != len(self._t_params):
                raise RuntimeError("teacher and student have different parameter lists; was the student rebuilt?")
            self._s_params = s_params
            self._s_buffers = [b.detach() for b in student.buffers()]
            self._student = student
        return self._s_params, self._s_buffers

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> float:
        """Blend the student into the teacher; returns the effective decay used."""
        alpha = ema_decay(step, self.decay, self.warmup)
        s_params, s_buffers = self._student_tensors(student)
        torch._foreach_lerp_(self._t_params, s_params, 1.0 - alpha)
        for t_buf, s_buf in zip(self._t_buffers, s_buffers):
            if t_buf.dtype.is_floating_point:
                t_buf.lerp_(s_buf, 1.0 - alpha)
            else:
                t_buf.copy_(s_buf)
        self.num_updates += 1
        return alpha

    def __call__(self, x: torch.Tensor) -> Any:
        if self.module.training:  # eval() walks every submodule: only when something switched it
            self.module.eval()
        with torch.no_grad():
            return self.module(x)

    def state_dict(self) -> Dict[str, Any]:
        return {"weights": self.module.state_dict(), "num_updates": self.num_updates,
                "decay": self.decay, "warmup": self.warmup}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.module.load_state_dict(state["weights"])
        self.num_updates = int(state.get("num_updates", 0))

"""EMATeacher on a small module: the blend formula, in-place restore, buffers, a rebuilt student."""
import pytest
import torch
from torch import nn

from nnunet_proto.training.ema import EMATeacher


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Conv2d(3, 2, 1))


def test_update_blends_parameters_and_float_buffers_and_copies_integer_buffers():
    student = _net(0)
    teacher = EMATeacher(student, decay=0.9, warmup=False)
    before = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student[1].running_mean.add_(2.0)
        student[1].num_batches_tracked.add_(5)
    for step in range(2):  # the cached tensor lists must keep following the live student
        alpha = teacher.update(student, step)
        assert alpha == pytest.approx(0.9)
    s = student.state_dict()
    for k, old in before.items():
        new = teacher.module.state_dict()[k]
        if old.dtype.is_floating_point:
            # two blends towards a fixed student: t2 = 0.81 t0 + 0.19 s
            assert torch.allclose(new, 0.81 * old + 0.19 * s[k], atol=1e-6), k
        else:
            assert torch.equal(new, s[k]), k


def test_load_state_dict_keeps_the_teacher_tensors_that_update_writes():
    student = _net(0)
    teacher = EMATeacher(student, decay=0.5, warmup=False)
    other = EMATeacher(_net(1), decay=0.5, warmup=False)
    teacher.load_state_dict(other.state_dict())
    teacher.update(student, 0)
    expected = 0.5 * other.module[0].weight + 0.5 * student[0].weight
    assert torch.allclose(teacher.module[0].weight, expected.detach())


def test_a_rebuilt_student_is_picked_up_and_a_different_one_refused():
    teacher = EMATeacher(_net(0), decay=0.0, warmup=False)
    replacement = _net(2)
    teacher.update(replacement, 0)  # decay 0: the teacher becomes the new student
    assert torch.equal(teacher.module[0].weight, replacement[0].weight.detach())
    with pytest.raises(RuntimeError, match="different parameter lists"):
        teacher.update(nn.Conv2d(1, 1, 1), 1)


def test_teacher_runs_in_eval_mode_even_if_switched_to_train():
    teacher = EMATeacher(_net(0))
    teacher.module.train()
    teacher(torch.randn(2, 1, 8, 8))
    assert not teacher.module.training and not teacher.module[1].training

"""ops/components.py: largest connected component per class (the BCP/MPER codes' pseudo-label clean-up)."""
import pytest
import torch

from nnunet_proto.ops.components import largest_component_only


def test_keeps_the_largest_component_of_each_class_2d():
    lab = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    lab[0, 0, 0:3, 0:3] = 1  # 9 voxels: kept
    lab[0, 0, 6:8, 6:8] = 1  # 4 voxels: an island -> background
    lab[0, 0, 5, 0] = 2  # single voxel of class 2: its own largest component, kept
    lab[0, 0, 0, 7] = -1  # dropped voxel (gate): untouched
    lab[1, 0, 4:6, 4:6] = 1
    lab[1, 0, 3, 3] = 1  # touches (4, 4) diagonally: one component with full connectivity
    out = largest_component_only(lab, num_classes=3)
    expected = lab.clone()
    expected[0, 0, 6:8, 6:8] = 0
    assert torch.equal(out, expected)
    assert out.dtype == lab.dtype and torch.equal(lab[0, 0, 6:8, 6:8], torch.ones(2, 2, dtype=torch.long))  # input kept


def test_3d_and_classes_are_independent():
    lab = torch.zeros(1, 1, 4, 6, 6, dtype=torch.int64)
    lab[0, 0, 0:2, 0:2, 0:2] = 2  # 8 voxels
    lab[0, 0, 3, 5, 5] = 2  # island
    lab[0, 0, 3, 0, 5] = 1  # class 1: one voxel, kept even though class 2 has a larger component
    out = largest_component_only(lab, num_classes=3)
    assert out[0, 0, 3, 5, 5] == 0 and out[0, 0, 3, 0, 5] == 1 and int((out == 2).sum()) == 8


def test_rejects_a_channel_dimension_that_is_not_one():
    with pytest.raises(ValueError, match=r"\(B, 1, \*spatial\)"):
        largest_component_only(torch.zeros(1, 3, 4, 4, dtype=torch.long), 3)

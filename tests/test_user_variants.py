"""A user's own trainer variant gets the short schedules exactly as the README shows.

The README tells users to write a file on ``nnUNet_extTrainer`` with their subclass and
``globals().update(schedule_variants(MyTrainer))``; nnU-Net's own trainer lookup must then find
``MyTrainer_smoke`` / ``MyTrainer_250epochs`` with the user's config and the schedule of the suffix.
"""
from __future__ import annotations

import os
import textwrap

import pytest
from conftest import TRAINERS_DIR, build_trainer

USER_TRAINERS = textwrap.dedent('''
    from nnunet_proto.methods.cpcl import CPCL, CPCLConfig
    from nnunet_proto.training.base_trainer import nnUNetTrainerSemiSupervised
    from nnunet_proto.training.variants import schedule_variants


    class nnUNetTrainerCPCL_userbeta5(nnUNetTrainerSemiSupervised):
        method_class = CPCL
        config = CPCLConfig(beta=5.0)


    globals().update(schedule_variants(nnUNetTrainerCPCL_userbeta5))
''')


@pytest.mark.parametrize("suffix,epochs,iterations", [("smoke", 2, 5), ("250epochs", 250, 250)])
def test_user_defined_variant_gets_schedule_suffixes(suffix, epochs, iterations, synthetic_dataset, fresh_results,
                                                     tmp_path, monkeypatch):
    ext = tmp_path / "my_trainers"
    ext.mkdir()
    (ext / "my_cpcl_variants.py").write_text(USER_TRAINERS)
    monkeypatch.setenv("nnUNet_extTrainer", os.pathsep.join([str(ext), str(TRAINERS_DIR)]))

    trainer = build_trainer(f"nnUNetTrainerCPCL_userbeta5_{suffix}", synthetic_dataset)

    assert type(trainer).__name__ == f"nnUNetTrainerCPCL_userbeta5_{suffix}"
    assert [c.__name__ for c in type(trainer).__mro__][1] == "nnUNetTrainerCPCL_userbeta5"
    assert trainer.num_epochs == epochs
    assert trainer.num_iterations_per_epoch == iterations
    assert trainer.config.beta == 5.0  # the user's setting survives the schedule subclass

"""``<Trainer>_paper``: every method's paper-literal settings one ``-tr`` away (ablations, reproductions).

Found by nnU-Net's own lookup, the same constructor signature as nnUNetTrainer, the method really runs with
the literal config (which differs from our nnU-Net defaults), and the variants are not counted as
top-level trainers by the discovery that the contract tests iterate over.
"""
import inspect

import pytest
from conftest import TRAINERS_DIR, build_trainer, semi_supervised_trainer_names
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_proto.methods.bcp import BCPConfig
from nnunet_proto.methods.cpcl import CPCLConfig
from nnunet_proto.methods.mean_teacher import MeanTeacherConfig
from nnunet_proto.methods.mper import MPERConfig
from nnunet_proto.methods.mspa import MSPAConfig
from nnunet_proto.methods.pccs import PCCSConfig
from nnunet_proto.methods.unimatch import UniMatchConfig

LITERAL = {
    "nnUNetTrainerMeanTeacher": MeanTeacherConfig.ssl4mis(),
    "nnUNetTrainerCPCL": CPCLConfig.paper(),
    "nnUNetTrainerMSPA": MSPAConfig.paper(),
    "nnUNetTrainerMPER": MPERConfig.paper(),
    "nnUNetTrainerPCCS": PCCSConfig.paper(),
    "nnUNetTrainerBCP": BCPConfig.paper(),
    "nnUNetTrainerUniMatch": UniMatchConfig.paper(),
}


def test_every_method_trainer_has_a_literal_variant():
    methods = set(semi_supervised_trainer_names()) - {"nnUNetTrainerZeroSSL"}  # the A/A control has no paper
    assert methods == set(LITERAL)


def test_literal_variants_are_not_top_level_trainers():
    from nnunet_proto.training.discovery import semi_supervised_trainer_names as scan

    names = scan(TRAINERS_DIR)
    assert not [n for n in names if n.endswith("_paper")]
    assert "nnUNetTrainerMSPA_SPA" not in names and "nnUNetTrainerMSPA" in names
    assert "nnUNetTrainerPCCS_noAuxEncoder" not in names and "nnUNetTrainerPCCS" in names


def test_mspa_spa_ablation_variant_changes_only_the_spa_weight(synthetic_dataset, fresh_results):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    cls = recursive_find_trainer_class_by_name("nnUNetTrainerMSPA_SPA")
    assert cls.__mro__[1].__name__ == "nnUNetTrainerMSPA"
    assert cls.config == MSPAConfig(spa_weight=1.0) and MSPAConfig().spa_weight == 0.0
    trainer = build_trainer("nnUNetTrainerMSPA_SPA", synthetic_dataset)
    trainer.initialize()
    weights = trainer.method.weights(1.0)
    assert weights["spa"] == weights["lpa"] == weights["upa"] > 0
    pccs = recursive_find_trainer_class_by_name("nnUNetTrainerPCCS_noAuxEncoder")
    assert pccs.config == PCCSConfig(aux_encoder_gradient=False) and PCCSConfig().aux_encoder_gradient


@pytest.mark.parametrize("name", sorted(LITERAL))
def test_literal_variant_found_and_runs_with_the_literal_config(name, synthetic_dataset, fresh_results):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    variant = f"{name}_paper"
    cls = recursive_find_trainer_class_by_name(variant)
    assert cls.__name__ == variant and cls.__mro__[1].__name__ == name  # the lookup re-imports: compare names
    assert inspect.signature(cls.__init__, eval_str=True) == inspect.signature(nnUNetTrainer.__init__, eval_str=True)
    assert cls.config == LITERAL[name]
    assert cls.config != recursive_find_trainer_class_by_name(name).config, "literal form equals the defaults"
    trainer = build_trainer(variant, synthetic_dataset)
    trainer.initialize()
    assert trainer.method.config == LITERAL[name]
    assert trainer.resolved_config()["config"] == LITERAL[name].to_dict()

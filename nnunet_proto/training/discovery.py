"""Find the semi-supervised trainer classes defined in a trainers folder (tests and tools iterate over them)."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import List

from nnunet_proto.training.base_trainer import nnUNetTrainerSemiSupervised
from nnunet_proto.training.variants import LITERAL_SUFFIX, SCHEDULES


def semi_supervised_trainer_names(trainers_dir: Path, module_prefix: str = "_scan_") -> List[str]:
    """Names of the top-level semi-supervised trainers in ``trainers_dir`` (variants excluded), sorted by file.

    A class counts when it subclasses ``nnUNetTrainerSemiSupervised``, is defined in that file under its own
    name, and its name does not end in a variant suffix (``_smoke``, ``_250epochs``, ..., ``_paper``).
    """
    suffixes = (*SCHEDULES, LITERAL_SUFFIX)
    names = []
    for path in sorted(Path(trainers_dir).glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"{module_prefix}{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for name, obj in vars(module).items():
            if (isinstance(obj, type) and issubclass(obj, nnUNetTrainerSemiSupervised)
                    and obj is not nnUNetTrainerSemiSupervised and obj.__name__ == name
                    and obj.__module__ == module.__name__ and name.rsplit("_", 1)[-1] not in suffixes
                    and "variant_of" not in vars(obj)):
                names.append(name)
    return names

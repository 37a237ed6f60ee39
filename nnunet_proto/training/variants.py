"""Trainer variants in nnU-Net's naming style: short schedules (``<Trainer>_5epochs``, ``<Trainer>_smoke``) and
the paper's literal settings (``<Trainer>_paper``)."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

#: suffix -> (num_epochs, iterations per epoch or None = nnU-Net's 250, validation iterations or None = 50)
SCHEDULES: Dict[str, tuple] = {
    "smoke": (2, 5, 2),  # seconds on CPU: checks that everything runs
    "demo": (8, 60, 10),  # minutes on CPU: scripts/quickstart.sh
    "1epoch": (1, None, None),
    "5epochs": (5, None, None),
    "10epochs": (10, None, None),
    "50epochs": (50, None, None),
    "100epochs": (100, None, None),
    "250epochs": (250, None, None),
}


def schedule_variant(base: type, suffix: str, num_epochs: int, iterations: Optional[int] = None,
                     val_iterations: Optional[int] = None) -> type:
    """A subclass of ``base`` named ``<base>_<suffix>`` that only changes the schedule.

    The constructor restates nnUNetTrainer's exact signature, as nnU-Net 2.8 requires.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs = num_epochs
        if iterations is not None:
            self.num_iterations_per_epoch = iterations
        if val_iterations is not None:
            self.num_val_iterations_per_epoch = val_iterations

    name = f"{base.__name__}_{suffix}"
    doc = (f"{base.__name__} with {num_epochs} epoch(s)"
           + (f" of {iterations} iterations" if iterations else "")
           + (f", {val_iterations} validation iterations" if val_iterations else "") + ".")
    return type(name, (base,), {"__init__": __init__, "__doc__": doc, "__module__": base.__module__,
                                "__qualname__": name})


def schedule_variants(base: type) -> Dict[str, type]:
    """All short variants of ``base`` as {class name: class}, for a trainers/ module's globals()."""
    classes = [schedule_variant(base, suffix, *spec) for suffix, spec in SCHEDULES.items()]
    return {c.__name__: c for c in classes}


#: suffix of the variant that runs a method with its paper's literal settings instead of our nnU-Net defaults
LITERAL_SUFFIX = "paper"


def config_variant(base: type, suffix: str, config: Any, doc: str) -> Dict[str, type]:
    """``{"<base>_<suffix>": class}``: ``base`` with another method config, same schedule (nnU-Net's).

    For ablations one ``-tr`` away (``nnUNetTrainerMSPA_SPA``). The class records ``variant_of = base``,
    so trainer discovery does not count it as a top-level trainer.
    """
    name = f"{base.__name__}_{suffix}"
    cls = type(name, (base,), {"config": config, "variant_of": base, "__doc__": doc, "__module__": base.__module__,
                               "__qualname__": name})
    return {name: cls}


def literal_variant(base: type, config: Any) -> Dict[str, type]:
    """``{"<base>_paper": class}``: ``base`` with ``config`` (the method config's ``paper()`` form).

    Our defaults differ from the papers where nnU-Net's regime needs it (docs/methods/<method>.md, "Changes
    for nnU-Net's regime"); this variant keeps the literal form one ``-tr`` away, for ablations and for users
    who want to reproduce a paper's setting. Schedule: nnU-Net's (the benchmark sets its own).
    """
    return config_variant(base, LITERAL_SUFFIX, config,
                          f"{base.__name__} with the paper's literal settings ({type(config).__name__}.paper() or "
                          f"the method's literal constructor) instead of the nnU-Net defaults.")


#: issue 23's redesign, one switch per variant (``<Trainer>_<suffix>``) and all of them together (``_v2``); none is a
#: default until the validation screening puts it ahead (docs/methods/README.md, "Redesign variants")
REDESIGN: Dict[str, Dict[str, Any]] = {
    "strong": {"strong_view": True},  # teacher on the weak view, student on strong views (CutMix, intensity)
    "ema99": {"ema_mode": "per_step"},  # the published EMA decay per optimiser step (0.99: a 100-step lag)
    "quantile": {"threshold_mode": "quantile"},  # each predicted class keeps its most confident half
    "wband": {"weight_band": (0.3, 1.0)},  # each term's gradient share at full ramp in [0.3, 1] of the supervised
    "ramp20": {"rampup_length": 0.2},  # the ramp over the first 20 % of the run instead of all of it
}
#: the combined candidate: every switch but the ramp (the band sets the size of the weights; the ramp their timing)
REDESIGN_V2 = ("strong", "ema99", "quantile", "wband")


def redesign_variant(base: type, suffix: str) -> Dict[str, type]:
    """``{"<base>_<suffix>": class}``: ``base`` with the one switch ``REDESIGN[suffix]``."""
    changes = REDESIGN[suffix]
    return config_variant(base, suffix, base.config.replace(**changes),
                          f"{base.__name__} with {changes} (issue 23's redesign, one switch; not validated).")


def redesign_variants(base: type, gated: bool = True) -> Dict[str, type]:
    """``<base>_strong``, ``_ema99``, ``_quantile`` (only where the method trains on gated pseudo labels:
    ``gated``), ``_wband``, ``_ramp20`` and ``_v2`` (strong + ema99 + quantile + wband): ``base`` with one switch of
    :data:`REDESIGN` or all of them, for the validation screening of issue 23."""
    out: Dict[str, type] = {}
    suffixes = [s for s in REDESIGN if gated or s != "quantile"]
    for suffix in suffixes:
        out.update(redesign_variant(base, suffix))
    combined: Dict[str, Any] = {}
    for suffix in REDESIGN_V2:
        if suffix in suffixes:
            combined.update(REDESIGN[suffix])
    out.update(config_variant(base, "v2", base.config.replace(**combined),
                              f"{base.__name__} with issue 23's redesign together: {combined} (not validated)."))
    return out

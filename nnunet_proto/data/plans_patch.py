"""Plan patches: small JSON files that derive a cheaper plans file from nnU-Net's own plans.

A patch names a new ``plans_name`` and, per configuration, the settings to change:

    {"plans_name": "nnUNetPlans_cpu", "description": "...",
     "configurations": {"2d": {"patch_size": [128, 128], "batch_size": 4,
                               "base_num_features": 16, "max_num_features": 256}}}

Changing the patch size recomputes the U-Net topology (number of stages, pooling, kernel sizes) with
nnU-Net's own ``get_pool_and_conv_props``, exactly as the planner does. Preprocessing fields
(spacing, normalisation, ``data_identifier``) are never changed, so the patched plans train on the
already preprocessed data, and the results land in a separate ``Trainer__<plans_name>__<config>``
folder. Configurations the patch does not name are kept unchanged.

Plans are never lost: a patch never writes over its source plans, and an existing plans file of its
``plans_name`` is left alone when it already holds what the patch gives (setup scripts re-run it) and
replaced only with ``overwrite`` when it holds something else.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Tuple

PATCHABLE = {"patch_size", "batch_size", "base_num_features", "max_num_features", "n_conv_per_stage",
             "n_conv_per_stage_decoder"}
MIN_FEATURE_MAP_EDGE = 4  # nnU-Net's UNet_featuremap_min_edge_length


def _fit(values: List[int], n: int) -> List[int]:
    """Truncate a per-stage list to n entries or extend it by repeating its last value."""
    values = list(values)
    return values[:n] if len(values) >= n else values + [values[-1]] * (n - len(values))


def _resolve(plans: dict, name: str) -> dict:
    cfg = plans["configurations"].get(name)
    if cfg is None:
        raise KeyError(f"configuration {name!r} is not in the plans (has {sorted(plans['configurations'])})")
    if "inherits_from" in cfg:
        base = copy.deepcopy(_resolve(plans, cfg["inherits_from"]))
        base.update({k: v for k, v in cfg.items() if k != "inherits_from"})
        return base
    return copy.deepcopy(cfg)


def patch_configuration(cfg: dict, changes: Dict[str, Any]) -> dict:
    from nnunet_proto.training.compat import get_pool_and_conv_props

    unknown = set(changes) - PATCHABLE
    if unknown:
        raise ValueError(f"unknown plan patch fields {sorted(unknown)}; allowed: {sorted(PATCHABLE)}")
    cfg = copy.deepcopy(cfg)
    arch = cfg["architecture"]["arch_kwargs"]
    n_stages = arch["n_stages"]
    if "patch_size" in changes:
        patch = [int(p) for p in changes["patch_size"]]
        if len(patch) != len(cfg["spacing"]):
            raise ValueError(f"patch_size {patch} has {len(patch)} axes but the configuration has "
                             f"{len(cfg['spacing'])} (spacing {cfg['spacing']})")
        _, pool, conv, patch, _ = get_pool_and_conv_props(cfg["spacing"], patch, MIN_FEATURE_MAP_EDGE, 999999)
        n_stages = len(pool)
        cfg["patch_size"] = [int(p) for p in patch]
        arch.update(n_stages=n_stages, strides=[list(map(int, s)) for s in pool],
                    kernel_sizes=[list(map(int, k)) for k in conv])
    base = int(changes.get("base_num_features", arch["features_per_stage"][0]))
    top = int(changes.get("max_num_features", max(arch["features_per_stage"])))
    arch["features_per_stage"] = [min(top, base * 2 ** i) for i in range(n_stages)]
    arch["n_conv_per_stage"] = _fit(changes.get("n_conv_per_stage", arch["n_conv_per_stage"]), n_stages)
    arch["n_conv_per_stage_decoder"] = _fit(changes.get("n_conv_per_stage_decoder",
                                                        arch["n_conv_per_stage_decoder"]), n_stages - 1)
    if "batch_size" in changes:
        if int(changes["batch_size"]) < 1:
            raise ValueError(f"batch_size must be >= 1, got {changes['batch_size']}")
        cfg["batch_size"] = int(changes["batch_size"])
    return cfg


def apply_plans_patch(plans: dict, patch: dict) -> dict:
    """A new plans dict: ``plans`` with the patch applied (the input is not modified)."""
    if "plans_name" not in patch or not patch["plans_name"]:
        raise ValueError("a plan patch needs a 'plans_name' (the new plans file name, e.g. nnUNetPlans_cpu)")
    if "__" in patch["plans_name"]:
        raise ValueError("plans_name must not contain '__' (nnU-Net splits result folder names on it)")
    if not isinstance(patch.get("configurations", {}), dict) or not all(
            isinstance(c, dict) for c in patch.get("configurations", {}).values()):
        raise ValueError("a plan patch's 'configurations' maps configuration names to objects of settings, e.g. "
                         "{\"2d\": {\"batch_size\": 4}}")
    new = copy.deepcopy(plans)
    new["plans_name"] = patch["plans_name"]
    for name, changes in patch.get("configurations", {}).items():
        new["configurations"][name] = patch_configuration(_resolve(plans, name), changes)
    new.setdefault("nnunet_proto_patch", {})[patch["plans_name"]] = {
        "source_plans": plans.get("plans_name"), "description": patch.get("description", ""),
        "configurations": patch.get("configurations", {})}
    return new


def _read_json_object(path: Path, what: str) -> dict:
    """The JSON object in ``path``; a missing file, a folder, invalid JSON or another JSON type is a clear error."""
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder; give the JSON file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{what} {path} holds a JSON {type(obj).__name__}, not an object")
    return obj


def apply_patch_file(preprocessed_dataset_folder: str, patch_file: str, source_plans: str = "nnUNetPlans",
                     overwrite: bool = False) -> Tuple[Path, bool]:
    """Read ``<source_plans>.json`` and the patch, write ``<plans_name>.json`` beside it.

    Returns (its path, whether it was written). Never writes over the source plans. An existing plans file
    with exactly the content the patch gives is left alone (re-running a setup script is fine); one with
    other content is replaced only with ``overwrite`` (results trained with it would no longer match it).
    """
    folder = Path(preprocessed_dataset_folder)
    src = folder / f"{source_plans}.json"
    if not src.is_file():
        raise FileNotFoundError(f"{src} not found. Run nnUNetv2_plan_and_preprocess for this dataset first.")
    patch = _read_json_object(Path(patch_file), "plan patch")
    plans = _read_json_object(src, "plans file")
    new = apply_plans_patch(plans, patch)
    out = folder / f"{new['plans_name']}.json"
    if out.resolve() == src.resolve():
        raise ValueError(f"the patch {patch_file} has plans_name {new['plans_name']!r}, the plans it is applied to: "
                         f"it would overwrite its own source {src}. Give the patch another plans_name (e.g. "
                         f"{source_plans}_cpu).")
    if out.exists():
        try:
            same = json.loads(out.read_text()) == json.loads(json.dumps(new))
        except (OSError, ValueError):
            same = False
        if same:
            return out, False
        if not overwrite:
            raise FileExistsError(f"{out} already exists with other content than the patch {patch_file} gives "
                                  f"(applied to {src}). Pass --overwrite to replace it (runs trained with the old "
                                  f"plans then no longer match it), or give the patch another plans_name.")
    for name in patch.get("configurations", {}):
        data_dir = folder / new["configurations"][name]["data_identifier"]
        if not data_dir.is_dir():
            print(f"note: configuration {name!r} trains on {data_dir}, which does not exist yet; run "
                  f"nnUNetv2_preprocess -d {plans['dataset_name']} -c {name} before training it")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(new, indent=2))
    os.replace(tmp, out)
    return out, True

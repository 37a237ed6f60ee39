"""The benchmark scripts' setup guards (scripts/bench_lib.sh): a foreign dataset or an interrupted conversion is
refused with the fix named, a finished one is skipped, preprocessing reruns until every case is there."""
import json
import os
import subprocess

from conftest import REPO


def guard(tmp_path, call: str) -> subprocess.CompletedProcess:
    # under the scripts' own strict mode: a failing pipeline inside a guard must not end the caller
    script = f'set -euo pipefail; bench=acdc; . "{REPO / "scripts" / "bench_lib.sh"}"; {call}'
    return subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)


def test_convert_once_runs_skips_and_refuses(tmp_path):
    ds = tmp_path / "raw" / "Dataset027_ACDC"
    first = guard(tmp_path, f"convert_once {ds} echo converting")
    assert first.returncode == 0 and first.stdout.strip() == "converting"

    ds.mkdir(parents=True)
    (ds / "imagesTr").mkdir()  # a conversion that stopped before writing dataset.json
    partial = guard(tmp_path, f"convert_once {ds} echo converting")
    assert partial.returncode == 1 and "converting" not in partial.stdout
    assert "interrupted conversion" in partial.stderr and "Delete that folder" in partial.stderr
    assert (ds / "imagesTr").is_dir()  # nothing deleted

    (ds / "dataset.json").write_text(json.dumps({"name": "ACDC", "labels": {"background": 0}}))
    foreign = guard(tmp_path, f"convert_once {ds} echo converting")
    assert foreign.returncode == 1 and "converting" not in foreign.stdout
    assert "not written by nnunet_proto" in foreign.stderr and "unset nnUNet_raw" in foreign.stderr

    (ds / "dataset.json").write_text(json.dumps({"name": "ACDC", "nnunet_proto": {"seed": 0}}))
    ours = guard(tmp_path, f"convert_once {ds} echo converting")
    assert ours.returncode == 0 and ours.stdout == ""


def test_preprocess_once_reruns_until_every_case_is_preprocessed(tmp_path):
    ds = tmp_path / "raw"
    (ds / "labelsTr").mkdir(parents=True)
    for case in ("a", "b"):
        (ds / "labelsTr" / f"{case}.nii.gz").write_bytes(b"")
    data = tmp_path / "pre"
    assert guard(tmp_path, f"preprocess_once {data} {ds} echo run").stdout.strip() == "run"  # nothing yet
    data.mkdir()
    (data / "a.pkl").write_bytes(b"")
    assert guard(tmp_path, f"preprocess_once {data} {ds} echo run").stdout.strip() == "run"  # interrupted
    (data / "b.pkl").write_bytes(b"")
    assert guard(tmp_path, f"preprocess_once {data} {ds} echo run").stdout == ""  # complete


def test_count_files_is_zero_for_a_missing_folder_under_strict_mode(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("x.h5", "y.h5", "z.txt"):
        (tmp_path / "a" / name).write_bytes(b"")
    out = guard(tmp_path, f"echo $(count_files {tmp_path / 'a'} '*.h5') $(count_files {tmp_path / 'missing'} '*.h5')")
    assert out.returncode == 0 and out.stdout.split() == ["2", "0"]


def test_every_trainer_the_acdc_stages_name_exists(monkeypatch):
    """A typo in a stage's trainer list would only fail hours into a benchmark: each name resolves through
    nnU-Net's own trainer lookup (nnUNet_extTrainer)."""
    import re

    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    monkeypatch.setenv("nnUNet_extTrainer", str(REPO / "trainers"))
    text = (REPO / "scripts" / "acdc_benchmark.sh").read_text()
    names = set(re.findall(r"\bnnUNetTrainer\w*", text))
    assert {"nnUNetTrainerCPCL_v2", "nnUNetTrainerUniMatch", "nnUNetTrainerSelfTraining_share25"} <= names
    for name in sorted(names):
        assert recursive_find_trainer_class_by_name(name) is not None, name


def test_acdc_benchmark_precision_setting_is_checked_first(tmp_path):
    """A wrong NNUNET_PROTO_PRECISION stops the script before it builds a venv or touches a benchmark."""
    env = {**os.environ, "NNUNET_PROTO_PRECISION": "fp16", "NNUNET_PROTO_VENV": str(tmp_path / "venv"),
           "NNUNET_PROTO_WORK": str(tmp_path / "work")}
    out = subprocess.run(["bash", str(REPO / "scripts" / "acdc_benchmark.sh"), "redesign-best"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "NNUNET_PROTO_PRECISION must be bf16 or fp32, got 'fp16'" in out.stderr
    assert not (tmp_path / "venv").exists() and not (tmp_path / "work").exists()


def test_acdc_benchmark_export_and_import_need_a_benchmark_and_a_file(tmp_path):
    """The stages that carry runs between machines check their arguments before building a venv."""
    env = {**os.environ, "NNUNET_PROTO_VENV": str(tmp_path / "venv"), "NNUNET_PROTO_WORK": str(tmp_path / "work")}
    for stage in ("export", "import"):
        out = subprocess.run(["bash", str(REPO / "scripts" / "acdc_benchmark.sh"), stage, "acdc_x"], env=env,
                             capture_output=True, text=True)
        assert out.returncode == 2 and "usage: " in out.stderr and f"{stage} BENCHMARK FILE" in out.stderr
    assert not (tmp_path / "venv").exists() and not (tmp_path / "work").exists()
    usage = subprocess.run(["bash", str(REPO / "scripts" / "acdc_benchmark.sh")], env=env, capture_output=True,
                           text=True)
    assert "import BENCHMARK FILE" in usage.stderr and usage.stderr.rstrip().endswith("never on the test frames.")

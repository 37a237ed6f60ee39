"""scripts/benchmark_data.py: the benchmark subsets rebuilt from a (fake) public release and checked by hash."""
import h5py
import numpy as np
import pytest
from conftest import load_script

bd = load_script("benchmark_data")


def _h5(path, **arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v)


def _release(tmp_path):
    """An SSL4MIS-like ACDC folder (2 patients, frames 01/12 and 01/11, a slices/ subfolder) and a UA-MT-like LA one."""
    rng = np.random.default_rng(0)
    img = lambda: rng.random((2, 8, 8), dtype=np.float32)  # noqa: E731
    lab = lambda: rng.integers(0, 4, (2, 8, 8), dtype=np.uint8)  # noqa: E731
    acdc = tmp_path / "SSL4MIS" / "data" / "ACDC" / "data"
    for name in ("patient001_frame01", "patient001_frame12", "patient003_frame01", "patient003_frame11"):
        _h5(acdc / f"{name}.h5", image=img(), label=lab())
    _h5(acdc / "slices" / "patient001_frame01_slice_1.h5", image=img()[0], label=lab()[0])
    la = tmp_path / "UA-MT" / "2018LA_Seg_Training Set"
    _h5(la / "ABC" / "mri_norm2.h5", image=img(), label=lab())
    return acdc, la


def _manifest(acdc, la):
    """What the benchmarks' copy would be: patient001 labeled (renamed frames), patient003 image-only, ABC."""
    h = bd.file_hashes
    ren = {"patient001_frame01.h5": h(acdc / "patient001_frame01.h5"),
           "patient001_frame02.h5": h(acdc / "patient001_frame12.h5")}
    unl = {n: {"image": h(acdc / n)["image"]} for n in ("patient003_frame01.h5", "patient003_frame11.h5")}
    return {"acdc30_h5": {"files": ren}, "acdc_unlabeled30_h5": {"files": unl},
            "la20_h5": {"files": {"ABC.h5": h(la / "ABC" / "mri_norm2.h5")}}}


def test_build_verify_and_rerun(tmp_path, capsys):
    acdc, la = _release(tmp_path)
    manifest = _manifest(acdc, la)
    out = tmp_path / "out"
    folders = bd.build("acdc", acdc, out, manifest) + bd.build("la", la, out, manifest)
    assert sorted(p.name for p in (out / "acdc30_h5").iterdir()) == ["patient001_frame01.h5", "patient001_frame02.h5"]
    with h5py.File(out / "acdc_unlabeled30_h5" / "patient003_frame11.h5") as f:
        assert set(f) == {"image"}  # unlabeled as a user has it: no label
    with h5py.File(out / "acdc30_h5" / "patient001_frame02.h5") as f, \
            h5py.File(acdc / "patient001_frame12.h5") as g:
        assert np.array_equal(f["label"][()], g["label"][()])
    assert bd.verify(folders, manifest) == []
    bd.build("acdc", acdc, out, manifest)  # rerun: every file kept
    assert "0 written, 2 already there" in capsys.readouterr().out
    # a changed image is found, and a file already there with other content is never overwritten
    with h5py.File(out / "la20_h5" / "ABC.h5", "r+") as f:
        f["image"][0, 0, 0] += 1
    assert bd.verify([out / "la20_h5"], manifest) == [f"{out / 'la20_h5' / 'ABC.h5'}: 'image' differs from the "
                                                      "benchmark's copy"]
    with pytest.raises(SystemExit, match="exists with other content"):
        bd.build("la", la, out, manifest)


def test_release_folder_errors(tmp_path):
    acdc, la = _release(tmp_path)
    manifest = _manifest(acdc, la)
    # another version of the release: refused before its file is written
    with h5py.File(la / "ABC" / "mri_norm2.h5", "r+") as f:
        f["image"][0, 0, 0] += 1
    with pytest.raises(SystemExit, match="differs from the benchmarks' copy of ABC.h5"):
        bd.build("la", la, tmp_path / "o0", manifest)
    assert not any((tmp_path / "o0" / "la20_h5").iterdir())
    with pytest.raises(SystemExit, match="not data/ACDC/data/slices"):
        bd.build("acdc", acdc / "slices", tmp_path / "o1", manifest)
    (la / "ABC" / "mri_norm2.h5").unlink()
    with pytest.raises(SystemExit, match="mri_norm2.h5 is missing"):
        bd.build("la", la, tmp_path / "o2", manifest)


def test_shipped_manifest_lists_the_subsets():
    m = bd.load_manifest()
    counts = {k: len(v["files"]) for k, v in m.items()}
    assert counts == {"acdc30_h5": 60, "acdc_unlabeled30_h5": 60, "la20_h5": 20}
    labeled = {n.split("_")[0] for n in m["acdc30_h5"]["files"]}
    unlabeled = {n.split("_")[0] for n in m["acdc_unlabeled30_h5"]["files"]}
    assert len(labeled) == len(unlabeled) == 30 and not labeled & unlabeled
    assert all(set(v) == {"image"} for v in m["acdc_unlabeled30_h5"]["files"].values())

#!/usr/bin/env python3
"""Rebuild the benchmark data subsets from the public h5 releases, and check them.

The ACDC and left-atrium benchmarks of docs/benchmarks use three small folders; this script writes them
from the public downloads and checks every image (and label) against the SHA-256 of the copy the
benchmarks ran on (scripts/benchmark_data.json), so a user knows the data is the same.

    # ACDC: the SSL4MIS release, folder data/ACDC/data (patientXXX_frameYY.h5 volumes with image + label)
    python scripts/benchmark_data.py acdc SSL4MIS/data/ACDC/data OUT
        -> OUT/acdc30_h5 (30 patients, both frames, named frame01/frame02 in frame-number order)
           OUT/acdc_unlabeled30_h5 (30 other patients, original file names, image only)
    # left atrium: the UA-MT release, folder "data/2018LA_Seg_Training Set" (<ID>/mri_norm2.h5)
    python scripts/benchmark_data.py la "UA-MT/data/2018LA_Seg_Training Set" OUT
        -> OUT/la20_h5 (20 cases, <ID>.h5)
    # check folders made earlier (or by someone else)
    python scripts/benchmark_data.py verify OUT/acdc30_h5 OUT/acdc_unlabeled30_h5 OUT/la20_h5

Sources: ACDC (Bernard et al., IEEE TMI 2018, doi:10.1109/TMI.2018.2837502) as converted to h5 by SSL4MIS
(github.com/HiLab-git/SSL4MIS); the 2018 Atrial Segmentation Challenge (Xiong et al., Medical Image
Analysis 2021, doi:10.1016/j.media.2020.101832) as converted to h5 by UA-MT (github.com/yulequan/UA-MT).
A folder that already holds the right files is left as it is; a file with other content is an error
(nothing is overwritten).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

MANIFEST = Path(__file__).with_name("benchmark_data.json")
FRAME = re.compile(r"^(patient\d{3})_frame(\d+)\.h5$")


def array_hash(a: np.ndarray) -> str:
    """SHA-256 of an array's values (float32 or uint8, C order): independent of h5 chunking/compression."""
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def file_hashes(path: Path) -> Dict[str, str]:
    import h5py

    with h5py.File(path, "r") as f:
        return {k: array_hash(f[k][()]) for k in ("image", "label") if k in f}


def load_manifest(path: Path = MANIFEST) -> dict:
    return json.loads(path.read_text())


def _write_h5(src: Path, dst: Path, expected: Dict[str, str]) -> None:
    """Copy the datasets named in ``expected`` from src into dst, after checking them against their SHA-256
    (a release with other content is refused before anything is written); via a temporary file, so an
    interrupted copy leaves nothing behind."""
    import h5py

    tmp = dst.with_name(dst.name + ".partial")
    with h5py.File(src, "r") as fi:
        arrays = {}
        for k, digest in expected.items():
            if k not in fi:
                raise SystemExit(f"{src} has no '{k}' dataset: is this the h5 release the script names?")
            arrays[k] = fi[k][()]
            if array_hash(arrays[k]) != digest:
                raise SystemExit(f"{src}: '{k}' differs from the benchmarks' copy of {dst.name} (another version "
                                 f"of the release?); nothing was written for it")
    try:
        with h5py.File(tmp, "w") as fo:
            for k, a in arrays.items():
                fo.create_dataset(k, data=a, compression="gzip")
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)


def _place(src: Path, dst: Path, expected: Dict[str, str]) -> str:
    """Write dst from src unless it is there already with the expected content; returns what was done."""
    if dst.exists():
        have = file_hashes(dst)
        if {k: have.get(k) for k in expected} == expected:
            return "kept"
        raise SystemExit(f"{dst} exists with other content than the benchmark's copy; move it away and rerun "
                         f"(nothing was overwritten)")
    _write_h5(src, dst, expected)
    return "written"


def acdc_frames(release: Path, patient: str) -> List[Path]:
    frames = sorted((p for p in release.glob(f"{patient}_frame*.h5") if FRAME.match(p.name)),
                    key=lambda p: int(FRAME.match(p.name).group(2)))
    if len(frames) != 2:
        raise SystemExit(f"{release} holds {len(frames)} h5 files of {patient} (expected its 2 frames, "
                         f"patientXXX_frameYY.h5): give the SSL4MIS folder data/ACDC/data, not data/ACDC/data/slices")
    return frames


def build(kind: str, release: Path, out: Path, manifest: Optional[dict] = None) -> List[Path]:
    """Write the subset folders of ``kind`` ('acdc' or 'la') into ``out``; returns the folders."""
    manifest = manifest or load_manifest()
    if not release.is_dir():
        raise SystemExit(f"release folder {release} does not exist")
    written = []
    folders = {"acdc": ("acdc30_h5", "acdc_unlabeled30_h5"), "la": ("la20_h5",)}[kind]
    for name in folders:
        entry = manifest[name]
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        done = {"kept": 0, "written": 0}
        for fname, expected in entry["files"].items():
            if kind == "la":
                src = release / fname[: -len(".h5")] / "mri_norm2.h5"
            elif name == "acdc30_h5":  # both frames in frame-number order, renamed frame01 / frame02
                patient, idx = FRAME.match(fname).group(1), int(FRAME.match(fname).group(2))
                src = acdc_frames(release, patient)[idx - 1]
            else:
                src = release / fname
            if not src.is_file():
                raise SystemExit(f"{src} is missing from the release folder {release}")
            done[_place(src, folder / fname, expected)] += 1
        print(f"{folder}: {done['written']} written, {done['kept']} already there")
        written.append(folder)
    bad = verify(written, manifest)
    if bad:
        raise SystemExit("\n".join(bad) + "\nThe release differs from the copy the benchmarks used (see above).")
    return written


def verify(folders: List[Path], manifest: Optional[dict] = None) -> List[str]:
    """Every file of the named subset folders against the manifest; returns the problems (empty: identical)."""
    manifest = manifest or load_manifest()
    problems = []
    for folder in folders:
        entry = manifest.get(folder.name)
        if entry is None:
            problems.append(f"{folder}: unknown subset (expected one of {', '.join(sorted(manifest))})")
            continue
        present = {p.name for p in folder.glob("*.h5")}
        for fname, expected in entry["files"].items():
            if fname not in present:
                problems.append(f"{folder / fname}: missing")
                continue
            have = file_hashes(folder / fname)
            for key, digest in expected.items():
                if have.get(key) != digest:
                    problems.append(f"{folder / fname}: '{key}' differs from the benchmark's copy")
        extra = sorted(present - set(entry["files"]))
        if extra:
            problems.append(f"{folder}: {len(extra)} file(s) not in the subset, e.g. {extra[0]}")
    return problems


def make_manifest(folders: List[Path]) -> dict:
    """The manifest of existing subset folders (how scripts/benchmark_data.json was made)."""
    return {f.name: {"files": {p.name: file_hashes(p) for p in sorted(f.glob("*.h5"))}} for f in folders}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    for kind in ("acdc", "la"):
        s = sub.add_parser(kind, help=f"write the {kind} subset folder(s) from the public release")
        s.add_argument("release", type=Path)
        s.add_argument("out", type=Path)
    s = sub.add_parser("verify", help="check subset folders against the manifest")
    s.add_argument("folders", type=Path, nargs="+")
    s = sub.add_parser("manifest", help="print the manifest of subset folders (maintainers)")
    s.add_argument("folders", type=Path, nargs="+")
    args = p.parse_args(argv)
    if args.cmd == "manifest":
        print(json.dumps(make_manifest(args.folders), indent=1, sort_keys=True))
        return 0
    if args.cmd == "verify":
        bad = verify(args.folders)
        print("\n".join(bad) if bad else f"{len(args.folders)} folder(s) identical to the benchmarks' copy")
        return 1 if bad else 0
    build(args.cmd, args.release, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

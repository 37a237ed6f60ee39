"""Where the stray islands of benchmark predictions lie, relative to the reference segmentation.

    python scripts/island_locations.py LABELS_DIR PRED_DIR [PRED_DIR ...] [-l 1 2 3] [--near-mm 10]

For each prediction folder (e.g. <results-dir>/runs/<trainer>/labeled4_seed0/test_predictions), the
island voxels (outside each class' largest connected component, what nnU-Net's postprocessing removes)
are split into those on the reference foreground (fragments on the organ), near it (within --near-mm,
image spacing) and far from it (farther, or on slices/volumes without reference foreground). Prints a
markdown table; shares of island voxels, and the island share of all predicted voxels.
"""
import argparse
import json
from pathlib import Path

from nnunet_proto.evaluation.islands import folder_island_locations


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("labels_dir", type=Path, help="reference segmentations (e.g. nnUNet_raw/DatasetXXX/labelsTs)")
    p.add_argument("predictions", type=Path, nargs="+", help="prediction folders, same file names")
    p.add_argument("-l", "--labels", type=int, nargs="+", help="classes (default: every foreground label of "
                   "the labels folder's dataset.json, else 1 2 3)")
    p.add_argument("--near-mm", type=float, default=10.0, help="'near' distance to the reference foreground")
    p.add_argument("--file-ending", default=".nii.gz")
    a = p.parse_args(argv)
    labels = a.labels
    if labels is None:
        ds = a.labels_dir.parent / "dataset.json"
        names = json.loads(ds.read_text())["labels"] if ds.is_file() else {"1": 1, "2": 2, "3": 3}
        labels = sorted(int(v) for v in names.values() if isinstance(v, int) and v > 0)
    print(f"| predictions | island share of predicted voxels | on reference | near (≤ {a.near_mm:g} mm) | far |")
    print("|---|---|---|---|---|")
    for folder in a.predictions:
        t = folder_island_locations(folder, a.labels_dir, labels, a.near_mm, a.file_ending)
        n = max(t["islands"], 1)
        print(f"| {folder} | {t['islands'] / max(t['predicted'], 1):.3f} | {t['in_reference'] / n:.2f} | "
              f"{t['near'] / n:.2f} | {t['far'] / n:.2f} |")


if __name__ == "__main__":
    main()

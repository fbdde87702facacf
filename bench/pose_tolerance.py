"""Pose tolerance of finished runs: both heads on a set's test split with every image (and its
ground truth) turned by each of the given angles about its centre, borders reflected as in
training. A proxy for parts that arrive turned on the line (MPDD-like sets are not at hand):
a model that only knows the training images' poses should reject turned good parts; one trained
with pose augmentation (`augment`) should not, within the range it was trained on.

    .venv/bin/python bench/pose_tolerance.py RUN [RUN ...] --data ../shared/datasets/hazelnut [--degrees 0 20 45 90]

Prints a Markdown table: the field's metrics and, at each run's shipped thresholds, false rejects
of the test's good parts and escapes of its defective ones.
"""

import argparse
import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np

from machine import describe
from trainer.data.pose import pose_summary, turned
from trainer.evaluate import TestSet, both_heads, by_head, load_run, radar_record, read_test_set


def turned_test_set(test: TestSet, degrees: float) -> TestSet:
    """Every image and mask turned by `degrees` (0: the test set as it is)."""
    if not degrees:
        return test
    masks = [turned(mask.astype(np.uint8), degrees, cv2.INTER_NEAREST).astype(bool) for mask in test.masks]
    return dataclasses.replace(test, images=np.stack([turned(image, degrees) for image in test.images]),
                               masks=np.stack(masks))


def row(run: Path, pose: str, degrees: float, head: str, metrics: dict) -> str:
    counts = metrics["verdicts"]["counts"]
    figures = " | ".join(f"{100 * metrics[k]:.1f}" for k in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap"))
    return (f"| {run.name} | {pose} | {degrees:g}° | {head} | {figures} | "
            f"{counts['false_reject']}/{counts['false_reject'] + counts['true_pass']} | "
            f"{counts['escape']}/{counts['escape'] + counts['true_fail']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="finished `trainer fit` runs")
    parser.add_argument("--data", type=Path, required=True, help="the MVTec-layout set the runs were trained on")
    parser.add_argument("--degrees", type=float, nargs="+", default=[0, 20, 45, 90])
    args = parser.parse_args()
    print(f"Test split of {args.data}, turned; {describe()}\n")
    print("| run | pose augmentation | turn | head | image AUROC | pixel AUROC | AUPRO (0.3) | pixel AP | "
          "false rejects (test good) | escapes (test defective) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        cfg, model, thresholds = load_run(run)
        radar = radar_record(run, cfg, model)
        trained = pose_summary(json.loads((run / "config.json").read_text())["data"].get("pose"))
        test = read_test_set(args.data, model.frame_size)
        for degrees in args.degrees:
            metrics, _ = both_heads(cfg, model, thresholds, radar, turned_test_set(test, degrees))
            for head, figures in by_head(metrics).items():
                print(row(run, trained, degrees, head, figures), flush=True)


if __name__ == "__main__":
    main()

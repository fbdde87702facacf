"""Each reduced-precision file of a bundle against its head's fp32 program on a data set's test
images (labelled good or defective): verdict agreement at the head's shipped image threshold,
largest score change, and image AUROC of both. Export's own parity check uses held-out training
images only; this is the check on images neither training nor export saw. Files whose CPU
features this machine lacks are listed as not measured.

    .venv/bin/python bench/precision_parity.py --bundle B --data ../shared/datasets/bottle
"""

import argparse
from pathlib import Path

import numpy as np

from edge.runtime.cpu_features import station_cpu_features
from edge.runtime.exported import ExportedCpuBackend
from edge.runtime.openvino import OpenVinoCpuBackend
from protocols.bundle import MANIFEST_NAME, HeadSpec, Manifest
from trainer.data.mvtec import read_rgb, scan_mvtec
from trainer.evaluation.metrics import image_auroc


def scores_of(backend, head: HeadSpec, images: np.ndarray, batch: int) -> np.ndarray:
    second = np.concatenate([backend.infer(images[i:i + batch])[1] for i in range(0, len(images), batch)])
    return second if head.score_from_map else head.method.one_class.score(second)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="an MVTec-layout folder with a test split")
    args = parser.parse_args()
    manifest = Manifest.model_validate_json((args.bundle / MANIFEST_NAME).read_text())
    spec = manifest.input
    folder = scan_mvtec(args.data, require_test=True)
    images = np.stack([read_rgb(s.image, spec.height) for s in folder.test])
    labels = np.array([s.defect != "good" for s in folder.test])
    print(f"### Reduced precision against fp32 on {args.data.name}'s test images ({len(images)}: "
          f"{int((~labels).sum())} good, {int(labels.sum())} defective)\n")
    print("| head | file | precision | verdict agreement | max abs score change | image AUROC fp32 → file |")
    print("|---|---|---|---|---|---|")
    for head in manifest.heads:
        program = next(f for f in head.files if f.format == "torch.export")
        fp32 = scores_of(ExportedCpuBackend(args.bundle / program.path, program, manifest), head, images,
                         spec.max_batch)
        threshold = head.thresholds.image
        reduced_files = [f for f in head.files if f.precision != "fp32" and f.format == "openvino-ir"]
        if not reduced_files:
            print(f"| {head.name} | none | | export's parity check shipped no reduced-precision file | | |")
        for entry in reduced_files:
            if missing := sorted(set(entry.cpu_features) - station_cpu_features()):
                print(f"| {head.name} | {entry.path} | {entry.precision} | not measured: this CPU lacks "
                      f"{', '.join(missing)} | | |")
                continue
            reduced = scores_of(OpenVinoCpuBackend(args.bundle / entry.path, entry, manifest), head, images,
                                spec.max_batch)
            agreement = np.mean((fp32 >= threshold) == (reduced >= threshold))
            print(f"| {head.name} | {entry.path} | {entry.precision} | {100 * agreement:.1f} % | "
                  f"{np.abs(reduced - fp32).max():.3g} | {100 * image_auroc(labels, fp32):.2f} → "
                  f"{100 * image_auroc(labels, reduced):.2f} |", flush=True)


if __name__ == "__main__":
    main()

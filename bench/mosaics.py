"""Large frames where a real defect is small: mosaics of grid × grid real images of an MVTec-layout
set (bottle: 4 × 4 images of 512 px → 2048-px frames), never upscaled, written in the MVTec layout
the trainer reads, so `trainer fit` and `trainer eval` (and bench/accuracy.py) take them as a set.

- train/good: mosaics of distinct training images (good parts only, as the trainer needs). The
  mosaics the trainer's default split holds out (model selection, thresholds) are made from their
  own disjoint share of the source's training images: a threshold set on parts the model trained on
  would sit too low for new parts (on mosaics made before this rule, a 30-minute run's norm-guided
  head rejected all 20 test good mosaics);
- test/good: mosaics of the test split's good images;
- test/<defect>: one defective test image at a random cell among test good images, its mask placed
  there (ground_truth/<defect>/<name>_mask.png): one small defect in a large field of view.

Test mosaics never contain a training image. Lossless PNG; seeded, so the same arguments write the
same set.

    .venv/bin/python bench/mosaics.py ../shared/datasets/bottle runs/mosaics/bottle [--grid 4 --train 200]
"""

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

from trainer.config import TrainConfig
from trainer.data.mvtec import GOOD, scan_mvtec, split_holdout


def read(path: Path, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    image = cv2.imread(str(path), flags)
    if image is None:
        sys.exit(f"mosaics: cannot decode {path}")
    return image


def mosaic(cells: list[np.ndarray], grid: int) -> np.ndarray:
    """grid² equal-sized images, row by row, as one image."""
    sizes = {cell.shape for cell in cells}
    if len(sizes) != 1:
        sys.exit(f"mosaics: the images differ in size ({sorted(sizes)}); mosaics need one size")
    return np.concatenate([np.concatenate(cells[row * grid:(row + 1) * grid], axis=1) for row in range(grid)])


def write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        sys.exit(f"mosaics: cannot write {path}")


def build(source: Path, out: Path, grid: int, train_count: int, seed: int) -> dict[str, int]:
    """Write the mosaic set; how many mosaics of each kind."""
    folder = scan_mvtec(source, require_test=True)
    cells = grid * grid
    test_good = [s.image for s in folder.test if s.defect == GOOD]
    if len(test_good) < cells:
        sys.exit(f"mosaics: {source} has too few good test images for {grid} × {grid} mosaics")
    rng = np.random.default_rng(seed)
    # The trainer splits by a seeded permutation that depends only on the count: this is its split.
    default = TrainConfig()
    roles = split_holdout([Path(f"{i:03d}.png") for i in range(train_count)], default.val_fraction,
                          default.calibration_fraction, default.seed)
    sources = split_holdout(folder.train, default.val_fraction, default.calibration_fraction, default.seed)
    for role in ("train", "selection", "calibration"):
        pool = getattr(sources, role)
        if len(pool) < cells:
            sys.exit(f"mosaics: {source} has {len(pool)} training images for {role} mosaics, {grid} × {grid} need "
                     f"{cells}")
        for name in getattr(roles, role):
            chosen = rng.choice(len(pool), cells, replace=False)
            write(out / "train" / GOOD / name.name, mosaic([read(pool[j]) for j in chosen], grid))
    for i in range(len(test_good)):
        chosen = rng.choice(len(test_good), cells, replace=False)
        write(out / "test" / GOOD / f"{i:03d}.png", mosaic([read(test_good[j]) for j in chosen], grid))
    defective = [s for s in folder.test if s.defect != GOOD]
    for sample in defective:
        image, mask = read(sample.image), read(sample.mask, cv2.IMREAD_GRAYSCALE)
        others = [read(test_good[j]) for j in rng.choice(len(test_good), cells - 1, replace=False)]
        at = int(rng.integers(cells))
        blank = np.zeros_like(mask)
        name = sample.image.stem
        write(out / "test" / sample.defect / f"{name}.png", mosaic(others[:at] + [image] + others[at:], grid))
        masks = [blank] * (cells - 1)
        write(out / "ground_truth" / sample.defect / f"{name}_mask.png", mosaic(masks[:at] + [mask] + masks[at:], grid))
    return {"train/good": train_count, "test/good": len(test_good), "test defective": len(defective)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="an MVTec-layout set with a test split and masks")
    parser.add_argument("out", type=Path)
    parser.add_argument("--grid", type=int, default=4, help="images a side")
    parser.add_argument("--train", type=int, default=200, help="training mosaics")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out.exists():
        sys.exit(f"mosaics: {args.out} exists; remove it first")
    counts = build(args.source, args.out, args.grid, args.train, args.seed)
    print(", ".join(f"{k}: {v}" for k, v in counts.items()), f"→ {args.out}")


if __name__ == "__main__":
    main()

"""MVTec-layout folders: find the images and masks, decode them, split off validation images.

Layout: root/train/good/*, root/test/good/*, root/test/<defect>/*, and
root/ground_truth/<defect>/<stem>.png or <stem>_mask.png for every defective test image.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
GOOD = "good"
MASK_SUFFIX = "_mask"


class DataError(Exception):
    """Unusable input data; the message is one self-explanatory line naming the path."""


@dataclass(frozen=True)
class TestSample:
    __test__ = False  # not a pytest test class despite the name

    image: Path
    defect: str  # "good" or the defect type
    mask: Path | None


@dataclass(frozen=True)
class MVTecFolder:
    root: Path
    train: tuple[Path, ...]
    test: tuple[TestSample, ...]

    @property
    def defect_types(self) -> tuple[str, ...]:
        return tuple(sorted({sample.defect for sample in self.test if sample.defect != GOOD}))


def is_image_file(path: Path) -> bool:
    # Dot-files such as macOS "._x.png" resource forks carry an image suffix but no image.
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if is_image_file(path))


def mask_key(path: Path) -> str:
    """The image stem a mask belongs to: masks are named <stem>.png or <stem>_mask.png."""
    return path.stem.removesuffix(MASK_SUFFIX)


def scan_mvtec(root: Path, require_test: bool) -> MVTecFolder:
    """All images of an MVTec-layout folder, sorted; a test split present is checked even if not required."""
    if not root.exists():
        raise DataError(f"{root}: no such folder")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    train_dir = root / "train" / GOOD
    if not train_dir.is_dir():
        raise DataError(f"{root}: missing train/good folder")
    train = list_images(train_dir)
    if not train:
        raise DataError(f"no images in {train_dir}")

    test_dir = root / "test"
    if not test_dir.is_dir():
        if require_test:
            raise DataError(f"{root}: missing test folder")
        return MVTecFolder(root=root, train=tuple(train), test=())
    test = _scan_test(root)
    if require_test and not test:
        raise DataError(f"no images in {test_dir} or its subfolders")
    return MVTecFolder(root=root, train=tuple(train), test=tuple(test))


def _scan_test(root: Path) -> list[TestSample]:
    images = {
        folder.name: list_images(folder) for folder in sorted((root / "test").iterdir()) if folder.is_dir()
    }
    masks = _scan_masks(root, images)
    samples = []
    for defect, paths in images.items():
        for image in paths:
            mask = masks.get(image)
            if defect != GOOD and mask is None:
                raise DataError(f"defect image {image} has no mask in {root / 'ground_truth' / defect}")
            samples.append(TestSample(image=image, defect=defect, mask=mask))
    return samples


def _scan_masks(root: Path, images: dict[str, list[Path]]) -> dict[Path, Path]:
    """Pairs every mask with its test image by stem: {image: mask}."""
    ground_truth = root / "ground_truth"
    if not ground_truth.is_dir():
        return {}
    pairs: dict[Path, Path] = {}
    for folder in sorted(path for path in ground_truth.iterdir() if path.is_dir()):
        by_stem = _by_stem(images.get(folder.name, []))
        for mask in list_images(folder):
            if folder.name == GOOD:
                raise DataError(f"mask {mask}: test/good images never have masks")
            image = by_stem.get(mask_key(mask)) or by_stem.get(mask.stem)
            if image is None:
                raise DataError(f"mask {mask} has no matching test image in {root / 'test' / folder.name}")
            if image in pairs:
                raise DataError(f"image {image} has two masks: {pairs[image]} and {mask}")
            pairs[image] = mask
    return pairs


def _by_stem(paths: list[Path]) -> dict[str, Path]:
    by_stem: dict[str, Path] = {}
    for path in paths:
        if path.stem in by_stem:
            raise DataError(f"images {by_stem[path.stem]} and {path} share a name, so masks cannot be paired")
        by_stem[path.stem] = path
    return by_stem


def read_rgb(path: Path, size: int) -> np.ndarray:
    """uint8 [size, size, 3] RGB; grayscale and 16-bit images are converted."""
    image = _decode(path, cv2.IMREAD_COLOR)
    return _resize_square(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), size)


def read_mask(path: Path, size: int) -> np.ndarray:
    """bool [size, size]; area resizing before the threshold keeps thin defects roughly as wide."""
    return _resize_square(_decode(path, cv2.IMREAD_GRAYSCALE), size) >= 128


def _decode(path: Path, flags: int) -> np.ndarray:
    # np.fromfile + imdecode instead of cv2.imread, which returns None without saying why.
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise DataError(f"cannot read image {path}: {err.strerror or err}") from err
    try:
        image = cv2.imdecode(data, flags) if data.size else None
    except cv2.error:
        image = None
    if image is None:
        raise DataError(f"cannot decode image {path}")
    return image


def _resize_square(image: np.ndarray, size: int) -> np.ndarray:
    height, width = image.shape[:2]
    shrinking = height >= size and width >= size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


@dataclass(frozen=True)
class HoldoutSplit:
    """train/good in three disjoint parts: what the model learns from, what chooses among its
    checkpoints (with synthetic defects), and what sets its thresholds. The last must not be the
    second: the chosen model's scores on the images that chose it are biased low."""
    train: list[Path]
    selection: list[Path]
    calibration: list[Path]


MIN_CALIBRATION_IMAGES = 2  # a spread needs two


def split_holdout(paths: Sequence[Path], selection_fraction: float, calibration_fraction: float,
                  seed: int) -> HoldoutSplit:
    """A seeded shuffle of the sorted paths: at least one image to train on and to select with,
    and at least two to calibrate with."""
    if not (0 < selection_fraction < 1 and 0 < calibration_fraction < 1
            and selection_fraction + calibration_fraction < 1):
        raise ValueError(f"selection fraction {selection_fraction} and calibration fraction {calibration_fraction} "
                         "must be in (0, 1) and leave images to train on")
    ordered = sorted(paths)
    n = len(ordered)
    n_selection = max(round(n * selection_fraction), 1)
    n_calibration = max(round(n * calibration_fraction), MIN_CALIBRATION_IMAGES)
    if n < n_selection + n_calibration + 1:
        raise ValueError(f"{n} good images: need at least {n_selection + n_calibration + 1} "
                         f"(training, model selection and {n_calibration} for thresholds)")
    shuffled = [ordered[i] for i in np.random.default_rng(seed).permutation(n)]
    return HoldoutSplit(train=sorted(shuffled[n_selection + n_calibration:]), selection=sorted(shuffled[:n_selection]),
                        calibration=sorted(shuffled[n_selection:n_selection + n_calibration]))

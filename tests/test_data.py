"""MVTec-layout scanning, decoding and the validation split, on a folder built here and on the real sets."""

import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from trainer.data.mvtec import DataError, read_mask, read_rgb, scan_mvtec, split_holdout


def write_image(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


def colour_image(height: int, width: int) -> np.ndarray:
    return np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8)


def defect_mask(size: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4 : size // 2, size // 4 : size // 2] = 255
    return mask


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Two train images (one grayscale), a good test image, two cracks masked as <stem>_mask and <stem>."""
    root = tmp_path / "part"
    write_image(root / "train" / "good" / "b.png", colour_image(40, 60))
    write_image(root / "train" / "good" / "a.jpg", colour_image(30, 30)[..., 0])
    write_image(root / "test" / "good" / "000.png", colour_image(32, 32))
    write_image(root / "test" / "crack" / "000.png", colour_image(32, 32))
    write_image(root / "test" / "crack" / "001.bmp", colour_image(32, 32))
    write_image(root / "ground_truth" / "crack" / "000_mask.png", defect_mask(32))
    write_image(root / "ground_truth" / "crack" / "001.png", defect_mask(32))
    return root


def test_scan_pairs_masks_named_with_and_without_the_mask_suffix(folder: Path):
    scanned = scan_mvtec(folder, require_test=True)
    assert scanned.train == (folder / "train/good/a.jpg", folder / "train/good/b.png")
    assert [(s.image.name, s.defect, s.mask and s.mask.name) for s in scanned.test] == [
        ("000.png", "crack", "000_mask.png"),
        ("001.bmp", "crack", "001.png"),
        ("000.png", "good", None),
    ]
    assert scanned.defect_types == ("crack",)


def remove(path: Path) -> None:
    for child in sorted(path.rglob("*"), reverse=True):
        child.unlink() if child.is_file() else child.rmdir()
    path.unlink() if path.is_file() else path.rmdir()


def remove_test_split(root: Path) -> None:
    remove(root / "test")
    remove(root / "ground_truth")


def test_scan_without_test_folder_is_fine_unless_required(folder: Path):
    remove_test_split(folder)
    assert scan_mvtec(folder, require_test=False).test == ()
    with pytest.raises(DataError, match="missing test folder"):
        scan_mvtec(folder, require_test=True)


def replace_root_by_file(root: Path) -> None:
    remove(root)
    root.write_text("not a folder")


def empty_train(root: Path) -> None:
    for path in (root / "train" / "good").iterdir():
        path.unlink()


def empty_test(root: Path) -> None:
    remove_test_split(root)
    (root / "test" / "good").mkdir(parents=True)


# case: (change to the valid folder, the path the message must name, words the message must contain)
BROKEN_FOLDERS = {
    "root missing": (remove, "", "no such folder"),
    "root is a file": (replace_root_by_file, "", "not a folder"),
    "no train/good": (lambda root: remove(root / "train" / "good"), "", "missing train/good"),
    "empty train/good": (empty_train, "train/good", "no images in"),
    "test without images": (empty_test, "test", "no images in"),
    "mask without image": (
        lambda root: write_image(root / "ground_truth" / "crack" / "007_mask.png", defect_mask(32)),
        "ground_truth/crack/007_mask.png",
        "no matching test image",
    ),
    "mask for an unknown defect type": (
        lambda root: write_image(root / "ground_truth" / "dent" / "000_mask.png", defect_mask(32)),
        "ground_truth/dent/000_mask.png",
        "no matching test image",
    ),
    "defect image without mask": (
        lambda root: write_image(root / "test" / "crack" / "002.png", colour_image(32, 32)),
        "test/crack/002.png",
        "has no mask",
    ),
    "mask for a good image": (
        lambda root: write_image(root / "ground_truth" / "good" / "000_mask.png", defect_mask(32)),
        "ground_truth/good/000_mask.png",
        "never have masks",
    ),
}


@pytest.mark.parametrize("case", BROKEN_FOLDERS)
def test_scan_errors_name_the_path_and_the_problem(folder: Path, case: str):
    break_folder, relative_path, problem = BROKEN_FOLDERS[case]
    break_folder(folder)
    with pytest.raises(DataError) as caught:
        scan_mvtec(folder, require_test=True)
    message = str(caught.value)
    assert str(folder / relative_path) in message and problem in message
    assert "\n" not in message


def test_read_rgb_converts_bgr_and_grayscale_and_resizes_any_shape(tmp_path: Path):
    blue = np.zeros((37, 53, 3), dtype=np.uint8)
    blue[..., 0] = 255  # OpenCV order: B, G, R
    rgb = read_rgb(write_image(tmp_path / "blue.png", blue), 32)
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 2] == 255).all() and (rgb[..., :2] == 0).all()

    gray = np.tile(np.arange(100, dtype=np.uint8), (80, 1))
    grown = read_rgb(write_image(tmp_path / "gray.png", gray), 128)
    assert grown.shape == (128, 128, 3)
    assert (grown[..., 0] == grown[..., 1]).all() and (grown[..., 1] == grown[..., 2]).all()
    assert grown[0, 0, 0] < 5 and grown[0, -1, 0] > 94  # left-to-right ramp kept


def test_read_mask_is_binary_and_keeps_a_thin_defect(tmp_path: Path):
    mask = np.zeros((512, 512), dtype=np.uint8)
    mask[:, 101:104] = 255  # 3 px wide at 512 px: nearest-neighbour sampling to 128 px would miss it
    read = read_mask(write_image(tmp_path / "line.png", mask), 128)
    assert read.dtype == bool and read.shape == (128, 128)
    assert read[:, 25].all() and read.sum() == 128


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n truncated"])
def test_undecodable_files_raise_data_error_naming_them(tmp_path: Path, content: bytes):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    for read in (read_rgb, read_mask):
        with pytest.raises(DataError, match=re.escape(f"cannot decode image {path}")):
            read(path, 16)


def test_missing_file_raises_data_error_naming_it(tmp_path: Path):
    with pytest.raises(DataError, match=re.escape(f"cannot read image {tmp_path / 'gone.png'}")):
        read_rgb(tmp_path / "gone.png", 16)


def test_holdout_split_is_seeded_disjoint_and_complete():
    paths = [Path(f"{i:03d}.png") for i in range(20)]
    split = split_holdout(paths, 0.1, 0.2, seed=3)
    assert (len(split.train), len(split.selection), len(split.calibration)) == (14, 2, 4)
    assert sorted(split.train + split.selection + split.calibration) == paths
    assert not set(split.calibration) & (set(split.train) | set(split.selection)), \
        "the images that choose the model must not set its thresholds"
    assert split_holdout(list(reversed(paths)), 0.1, 0.2, seed=3) == split
    assert split_holdout(paths, 0.1, 0.2, seed=4).calibration != split.calibration


def test_holdout_split_keeps_one_to_train_one_to_select_and_two_to_calibrate():
    split = split_holdout([Path(f"{i}.png") for i in range(4)], 0.01, 0.01, seed=0)
    assert (len(split.train), len(split.selection), len(split.calibration)) == (1, 1, 2)
    with pytest.raises(ValueError, match="3 good images: need at least 4"):
        split_holdout([Path(f"{i}.png") for i in range(3)], 0.01, 0.01, seed=0)


@pytest.mark.parametrize(("selection", "calibration"), [(0.0, 0.2), (0.1, 1.0), (0.5, 0.5), (-0.1, 0.2)])
def test_holdout_split_rejects_fractions_that_leave_nothing(selection: float, calibration: float):
    with pytest.raises(ValueError, match="fraction"):
        split_holdout([Path(f"{i}.png") for i in range(10)], selection, calibration, seed=0)


# (normal train, normal test, defective test, defect types), from the datasets README
REAL_SETS = {
    "hazelnut": (28, 6, 17, ("colour",)),
    "bottle": (209, 20, 63, ("broken_large", "broken_small", "contamination")),
    "magnetic_tile": (714, 238, 388, ("blowhole", "break", "crack", "fray", "uneven")),
}


@pytest.mark.parametrize("name", REAL_SETS)
def test_real_sets_scan_to_the_documented_counts(datasets_dir: Path, name: str):
    scanned = scan_mvtec(datasets_dir / name, require_test=True)
    good = [s for s in scanned.test if s.defect == "good"]
    defective = [s for s in scanned.test if s.defect != "good"]
    assert (len(scanned.train), len(good), len(defective), scanned.defect_types) == REAL_SETS[name]
    assert all(s.mask is None for s in good) and all(s.mask is not None for s in defective)


def test_real_grayscale_tile_of_odd_size_reads_as_rgb_square(datasets_dir: Path):
    path = scan_mvtec(datasets_dir / "magnetic_tile", require_test=False).train[0]
    image = read_rgb(path, 256)
    assert image.shape == (256, 256, 3)
    assert (image[..., 0] == image[..., 2]).all() and image.std() > 1

import cv2
import numpy as np
import pytest

from trainer.config import TrainConfig
from trainer.data.foreground import foreground_mask
from trainer.data.mvtec import read_rgb
from trainer.data.pose import (MIN_ROTATION_DEGREES, PoseAugmentation, choose_pose, pose_summary, rotation_spread,
                               rotations_to, wrap_degrees)
from trainer.data.pose import _centred, _gray, _log_spectrum
from trainer.training import prepare_data

SIZE = 128
TURNS = (-120.0, -30.0, 15.0, 90.0, 170.0)


def turned(image: np.ndarray, degrees: float, shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    matrix = cv2.getRotationMatrix2D(((SIZE - 1) / 2, (SIZE - 1) / 2), degrees, 1.0)
    matrix[:, 2] += shift
    return cv2.warpAffine(image, matrix, (SIZE, SIZE), borderMode=cv2.BORDER_REFLECT_101)


@pytest.fixture(scope="module")
def hazelnut(datasets_dir) -> np.ndarray:
    return read_rgb(sorted((datasets_dir / "hazelnut" / "train" / "good").iterdir())[0], SIZE)


@pytest.fixture(scope="module")
def tile_crops(datasets_dir) -> list[np.ndarray]:
    """Crops of one real magnetic-tile surface at different places: a texture in one orientation."""
    path = sorted((datasets_dir / "magnetic_tile" / "train" / "good").iterdir())[0]
    surface = read_rgb(path, 2 * SIZE)
    return [surface[y:y + SIZE, x:x + SIZE] for y, x in [(0, 0), (64, 16), (128, 128), (20, 100), (100, 40)]]


def test_an_objects_turn_is_measured_on_the_part_centred_on_its_foreground(hazelnut):
    foreground = foreground_mask(hazelnut, "object")
    reference = _centred(_gray(hazelnut), foreground)
    pictures = []
    for degrees in TURNS:  # turned and moved: the centring takes the move out
        image = turned(hazelnut, degrees, (6.0, -4.0))
        pictures.append(_centred(_gray(image), foreground_mask(image, "object")))
    np.testing.assert_allclose(rotations_to(reference, pictures, 360), TURNS, atol=5)


def test_a_textures_turn_is_measured_on_its_spectrum_wherever_the_crop_lies_up_to_a_half_turn(tile_crops):
    reference = _log_spectrum(_gray(tile_crops[0]))
    pictures = [_log_spectrum(_gray(turned(crop, degrees))) for crop, degrees in zip(tile_crops, TURNS)]
    found = rotations_to(reference, pictures, 180)
    assert np.abs(wrap_degrees(found - np.array(TURNS), 180)).max() <= 5


def test_auto_leaves_parts_placed_alike_as_they_are_and_turns_parts_that_vary(hazelnut, tile_crops):
    def decided(images: list[np.ndarray], is_object: bool) -> tuple[PoseAugmentation, dict]:
        images = np.stack(images)
        mode = "object" if is_object else "texture"
        return choose_pose("auto", images, np.stack([foreground_mask(im, mode) for im in images]), is_object)

    rng = np.random.default_rng(0)
    fixtured = [turned(hazelnut, a, tuple(s)) for a, s in zip(rng.uniform(-3, 3, 12), rng.uniform(-1, 1, (12, 2)))]
    assert decided(fixtured, True)[1]["mode"] == "none"
    assert decided(tile_crops, False)[1]["mode"] == "none"
    angles = rng.uniform(-90, 90, 12)
    augmentation, record = decided([turned(hazelnut, a) for a in angles], True)
    assert record["mode"] == "rotate" and record["chosen_by"] == "auto"
    assert abs(augmentation.degrees - np.abs(angles - angles.mean()).max()) <= 10
    turned_crops = [turned(crop, a) for crop, a in zip(tile_crops, (-60, -20, 10, 40, 70))]
    assert decided(turned_crops, False)[1]["mode"] == "rotate"
    moved = [turned(hazelnut, 0, tuple(s)) for s in rng.uniform(-12, 12, (12, 2))]  # up to ~9 % of the side
    augmentation, record = decided(moved, True)
    assert record["mode"] == "shift" and augmentation.degrees == 0 and 0.05 <= augmentation.shift <= 0.1
    assert rotation_spread(np.stack(moved), np.stack([foreground_mask(m, "object") for m in moved]), True)[0] \
        < MIN_ROTATION_DEGREES


def test_a_pose_turns_image_and_foreground_together_and_no_pose_draws_nothing():
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    image[30:70, 40:100] = 255
    foreground = image[..., 0] > 0
    rng = np.random.default_rng(1)
    same_image, same_foreground = PoseAugmentation()(image, foreground, rng)
    assert same_image is image and same_foreground is foreground
    assert rng.bit_generator.state == np.random.default_rng(1).bit_generator.state
    posed, region = PoseAugmentation(degrees=180, shift=0.05)(image, foreground, np.random.default_rng(2))
    again, _ = PoseAugmentation(degrees=180, shift=0.05)(image, foreground, np.random.default_rng(2))
    bright = posed[..., 0] > 127
    assert np.array_equal(posed, again) and not np.array_equal(posed, image)
    assert (bright & region).sum() / (bright | region).sum() > 0.9


def test_the_training_items_are_posed_and_the_decision_is_kept(datasets_dir):
    data = prepare_data(datasets_dir / "hazelnut", TrainConfig(profile="tiny", augment="auto"))
    assert data.pose["chosen_by"] == "auto" and data.pose["mode"] in ("none", "shift", "rotate")
    assert data.train.pose.degrees == pytest.approx(data.pose["degrees"], abs=0.05)
    assert data.train.pose.shift == pytest.approx(data.pose["shift"], abs=5e-4)
    by_hand = prepare_data(datasets_dir / "hazelnut", TrainConfig(profile="tiny", augment="rotate"))
    assert by_hand.pose == {"mode": "rotate", "chosen_by": "config", "degrees": 180, "shift": 0.062}
    assert by_hand.train.pose == PoseAugmentation(180, 1 / 16)
    plain = prepare_data(datasets_dir / "hazelnut", TrainConfig(profile="tiny", augment="none"))
    assert plain.pose == {"mode": "none", "chosen_by": "config", "degrees": 0, "shift": 0}
    assert plain.train.pose == PoseAugmentation()
    posed, unposed = by_hand.train[(0, 0)]["normal"], plain.train[(0, 0)]["normal"]
    assert posed.shape == unposed.shape and not np.array_equal(posed.numpy(), unposed.numpy())


def test_a_pose_record_reads_as_its_ranges():
    assert pose_summary(choose_pose("rotate", None, None, True)[1]) == "rotate ±180°, ±6.2% of the side"
    assert pose_summary(choose_pose("shift", None, None, True)[1]) == "shift ±6.2% of the side"
    assert pose_summary({"mode": "rotate", "chosen_by": "auto", "degrees": 38.0, "shift": 0.0}) == "rotate ±38°"
    assert pose_summary(choose_pose("none", None, None, True)[1]) == pose_summary(None) == "none"

"""Perlin regions, foregrounds, anomaly synthesis, the torch datasets and the sample writer."""

import re
from itertools import islice
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from trainer.data import synthesis
from trainer.data.color import choose_color
from trainer.data.foreground import choose_foreground, foreground_mask, load_user_masks
from trainer.data.mvtec import DataError, read_rgb, scan_mvtec
from trainer.data.perlin import perlin_mask, perlin_noise
from trainer.data.samples import write_synthetic_samples
from trainer.data.synthesis import (
    AUGMENTERS,
    AnomalySynthesizer,
    ProceduralTextures,
    TextureFolder,
    augment_source,
    list_textures,
    resolve_textures,
    self_augmented,
    texture_source,
)
from trainer.data.training_set import (SyntheticDefects, TrainingKeys, TrainingPairs, ValidationSet,
                                       to_model_range)

SIZE = 64


def random_image(seed: int, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def write_png(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def test_perlin_noise_is_zero_on_the_lattice_bounded_and_cropped_to_any_shape():
    noise = perlin_noise((64, 64), (4, 8), np.random.default_rng(0))
    np.testing.assert_allclose(noise[::16, ::8], 0, atol=1e-12)
    assert 0.3 < np.abs(noise).max() <= 1
    odd = perlin_noise((50, 70), (4, 3), np.random.default_rng(0))
    assert odd.shape == (50, 70)
    assert np.abs(np.diff(odd, axis=1)).max() < 0.25  # smooth: no jumps between neighbours


def test_perlin_masks_are_binary_varied_and_reproducible():
    masks = [perlin_mask(SIZE, np.random.default_rng(seed)) for seed in range(30)]
    coverage = np.array([mask.mean() for mask in masks])
    assert all(mask.dtype == bool and mask.shape == (SIZE, SIZE) for mask in masks)
    assert 0.01 < coverage.mean() < 0.3 and (coverage > 0).sum() > 20
    assert np.array_equal(perlin_mask(SIZE, np.random.default_rng(7)), masks[7])
    assert not np.array_equal(masks[7], masks[8])


@pytest.mark.parametrize("augment", AUGMENTERS, ids=lambda augment: augment.__name__)
def test_each_augmenter_keeps_uint8_rgb_shape(augment):
    image = random_image(0)
    out = augment(image, np.random.default_rng(0))
    assert out.dtype == np.uint8 and out.shape == image.shape


def test_augment_source_is_seeded_and_changes_the_image():
    image = random_image(1)
    first = augment_source(image, np.random.default_rng(5))
    assert np.array_equal(first, augment_source(image, np.random.default_rng(5)))
    assert not np.array_equal(first, image)


def tiles(image: np.ndarray, k: int) -> list[bytes]:
    """The k x k tiles of a square image, as sorted byte strings: equal lists mean a tile permutation."""
    step = image.shape[0] // k
    return sorted(
        image[row : row + step, col : col + step].tobytes()
        for row in range(0, image.shape[0], step)
        for col in range(0, image.shape[1], step)
    )


def test_self_augmentation_permutes_whole_tiles():
    image = random_image(2)
    shuffled = self_augmented(image, np.random.default_rng(0))
    assert not np.array_equal(shuffled, image)
    assert any(tiles(shuffled, k) == tiles(image, k) for k in (2, 4, 8))


def test_synthetic_image_differs_from_the_normal_only_inside_the_mask():
    image, foreground = random_image(3), np.zeros((SIZE, SIZE), dtype=bool)
    foreground[8:56, 8:56] = True
    synthesizer = AnomalySynthesizer(SIZE)
    for seed in range(5):
        synthetic, mask = synthesizer(image, foreground, np.random.default_rng(seed))
        assert synthetic.dtype == np.uint8 and mask.dtype == np.float32
        assert set(np.unique(mask)) == {0.0, 1.0}
        inside = mask.astype(bool)
        assert not (inside & ~foreground).any()
        assert np.array_equal(synthetic[~inside], image[~inside])
        assert (synthetic[inside] != image[inside]).any(axis=-1).mean() > 0.5


def test_anomalies_go_anywhere_when_the_foreground_is_empty():
    _, mask = AnomalySynthesizer(SIZE)(random_image(4), np.zeros((SIZE, SIZE), bool), np.random.default_rng(0))
    assert mask.mean() > 0


def test_texture_source_is_blended_with_opacity_between_0_2_and_0_8(tmp_path: Path, monkeypatch):
    """Black image, white texture, no augmentation: inside the mask the value is (1 - beta) * 255."""
    monkeypatch.setattr(synthesis, "augment_source", lambda image, rng: image)
    texture = write_png(tmp_path / "white.png", np.full((SIZE, SIZE, 3), 255, np.uint8))
    synthesizer = AnomalySynthesizer(SIZE, TextureFolder([texture], SIZE), texture_probability=1.0)
    black, foreground = np.zeros((SIZE, SIZE, 3), np.uint8), np.ones((SIZE, SIZE), bool)
    betas = []
    for seed in range(20):
        synthetic, mask = synthesizer(black, foreground, np.random.default_rng(seed))
        inside = synthetic[mask.astype(bool)]
        assert inside.min() == inside.max()  # one opacity for the whole anomaly
        betas.append(1 - inside.min() / 255)
    assert 0.2 - 1 / 255 <= min(betas) and max(betas) < 0.8 + 1 / 255
    assert max(betas) - min(betas) > 0.2


def test_textures_are_decoded_once(tmp_path: Path):
    texture = write_png(tmp_path / "texture.png", random_image(5))
    synthesizer = AnomalySynthesizer(SIZE, TextureFolder([texture], SIZE), texture_probability=1.0)
    image, foreground = random_image(6), np.ones((SIZE, SIZE), bool)
    synthesizer(image, foreground, np.random.default_rng(0))
    texture.unlink()
    synthesizer(image, foreground, np.random.default_rng(1))  # would raise DataError if read again


def test_the_textures_setting_names_a_folder_procedural_pictures_or_no_texture_source(tmp_path: Path):
    texture = write_png(tmp_path / "folder" / "t.png", random_image(5))
    assert texture_source("none", SIZE) is None
    folder = texture_source(tmp_path / "folder", SIZE)
    assert isinstance(folder, TextureFolder) and folder.paths == (texture,)
    procedural = texture_source("procedural", SIZE)
    assert isinstance(procedural, ProceduralTextures)
    first, second = procedural(np.random.default_rng(0)), procedural(np.random.default_rng(1))
    assert first.shape == second.shape == (SIZE, SIZE, 3) and first.dtype == np.uint8
    assert not np.array_equal(first, second)  # a new picture each draw, not one texture
    with pytest.raises(DataError, match="texture folder not found"):
        texture_source(tmp_path / "missing", SIZE)


def test_auto_textures_are_procedural_pictures_on_objects_and_a_surfaces_own_tiles_on_textures(tmp_path: Path):
    assert resolve_textures("auto", "object") == "procedural"
    assert resolve_textures("auto", "texture") == "none"
    for setting in ("procedural", "none", tmp_path):
        assert resolve_textures(setting, "object") == resolve_textures(setting, "texture") == setting
    with pytest.raises(ValueError, match="resolve"):
        texture_source("auto", SIZE)


def test_procedural_textures_fill_the_anomaly_as_often_as_the_texture_probability_says(monkeypatch):
    """A flat image's own tiles are flat: a non-flat anomaly came from the procedural source."""
    monkeypatch.setattr(synthesis, "augment_source", lambda image, rng: image)
    synthesizer = AnomalySynthesizer(SIZE, ProceduralTextures(SIZE), texture_probability=0.5)
    flat, foreground = np.full((SIZE, SIZE, 3), 128, np.uint8), np.ones((SIZE, SIZE), bool)
    textured = [np.ptp(synthesizer(flat, foreground, np.random.default_rng(seed))[0]) > 0 for seed in range(40)]
    assert 10 <= sum(textured) <= 30


def test_synthesizer_rejects_images_of_another_size():
    with pytest.raises(ValueError, match="64x64"):
        AnomalySynthesizer(SIZE)(random_image(0, 32), np.ones((32, 32), bool), np.random.default_rng(0))


def test_list_textures_is_recursive_and_sorted(tmp_path: Path):
    paths = [write_png(tmp_path / name, random_image(0)) for name in ("b/2.png", "a/1.jpg", "b/1.png")]
    (tmp_path / "notes.txt").write_text("not an image")
    assert list_textures(tmp_path) == sorted(paths)
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "missing"))):
        list_textures(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images in"):
        list_textures(tmp_path / "empty")


def test_texture_mode_foreground_is_everything():
    assert foreground_mask(random_image(0), "texture").all()


@pytest.mark.parametrize("name", ["hazelnut", "bottle"])
def test_object_foreground_covers_the_object_but_not_the_background(datasets_dir: Path, name: str):
    for path in scan_mvtec(datasets_dir / name, require_test=False).train[:8]:
        mask = foreground_mask(read_rgb(path, 128), "object")
        assert 0.1 < mask.mean() < 0.9, path
        assert mask[64, 64] and not mask[[0, 0, -1, -1], [0, -1, 0, -1]].any(), path


def test_foreground_falls_back_to_everything_on_a_uniform_image():
    assert foreground_mask(np.full((SIZE, SIZE, 3), 90, np.uint8), "object").all()


def test_user_masks_are_keyed_by_image_stem(tmp_path: Path):
    mask = np.zeros((32, 32, 3), np.uint8)
    mask[:16] = 255
    write_png(tmp_path / "000.png", mask)
    write_png(tmp_path / "001_mask.png", 255 - mask)
    masks = load_user_masks(tmp_path, 16)
    assert sorted(masks) == ["000", "001"]
    assert masks["000"][:8].all() and not masks["000"][8:].any()
    assert masks["001"][8:].all() and not masks["001"][:8].any()
    (tmp_path / "002.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "002.png"))):
        load_user_masks(tmp_path, 16)


@pytest.fixture
def normal_images() -> tuple[np.ndarray, np.ndarray]:
    images = np.stack([random_image(seed) for seed in range(3)])
    return images, np.ones(images.shape[:3], dtype=bool)


def test_training_pairs_are_reproducible_per_seed_epoch_and_index(normal_images):
    images, foregrounds = normal_images
    pairs = TrainingPairs(images, foregrounds, AnomalySynthesizer(SIZE), seed=1, channels=3)
    first = pairs[0, 2]
    assert len(pairs) == 3
    assert torch.equal(first["normal"], to_model_range(images[2], 3))
    assert first["anomalous"].shape == (3, SIZE, SIZE) and first["mask"].shape == (1, SIZE, SIZE)
    assert first["anomalous"].min() >= -1 and first["anomalous"].max() <= 1

    again = TrainingPairs(images, foregrounds, AnomalySynthesizer(SIZE), seed=1, channels=3)[0, 2]
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(pairs[1, 2]["mask"], first["mask"])


def test_training_keys_run_epoch_after_epoch_in_whole_batches_and_resume_where_they_stopped():
    shares = DistributedSampler(range(10), num_replicas=1, rank=0, shuffle=True, seed=3, drop_last=True)
    keys = list(islice(TrainingKeys(shares, batch_size=4, start_step=0), 24))  # 3 epochs of 2 batches
    epochs = [[index for epoch, index in keys if epoch == e] for e in range(3)]
    assert [len(indices) for indices in epochs] == [8, 8, 8] and [e for e, _ in keys] == sorted(e for e, _ in keys)
    assert all(len(set(indices)) == 8 for indices in epochs) and epochs[0] != epochs[1]
    resumed = list(islice(TrainingKeys(shares, batch_size=4, start_step=3), 12))  # mid-epoch 1
    assert resumed == keys[12:]


def base_image(item: dict[str, torch.Tensor], images: np.ndarray) -> int | None:
    """Index of the normal image an anomaly was made from: the one it equals outside the mask."""
    outside = item["mask"][0] == 0
    for index, image in enumerate(images):
        if torch.equal(item["anomalous"][:, outside], to_model_range(image, 3)[:, outside]):
            return index
    return None


def test_training_anomaly_is_made_from_a_randomly_chosen_normal_image(normal_images):
    images, foregrounds = normal_images
    pairs = TrainingPairs(images, foregrounds, AnomalySynthesizer(SIZE), seed=0, channels=3)
    bases = [base_image(pairs[0, index], images) for index in range(len(pairs))]
    assert None not in bases
    assert bases != list(range(len(pairs)))  # not always the item's own image


def test_validation_set_is_fixed_and_pairs_each_image_with_its_own_anomaly(normal_images):
    images, foregrounds = normal_images
    validation = ValidationSet(images, foregrounds, AnomalySynthesizer(SIZE), seed=0, channels=3)
    again = ValidationSet(images, foregrounds, AnomalySynthesizer(SIZE), seed=0, channels=3)
    assert validation.normal.shape == validation.anomalous.shape == (3, 3, SIZE, SIZE)
    assert validation.masks.shape == (3, 1, SIZE, SIZE)
    assert torch.equal(validation.anomalous, again.anomalous) and torch.equal(validation.masks, again.masks)
    outside = (validation.masks == 0).expand_as(validation.normal)
    assert torch.equal(validation.anomalous[outside], validation.normal[outside])
    assert (validation.masks.mean(dim=(1, 2, 3)) > 0).all()


def test_synthetic_defects_cycle_through_the_images_each_one_different_and_the_set_reproducible(normal_images):
    images, foregrounds = normal_images
    defects = SyntheticDefects(images, foregrounds, AnomalySynthesizer(SIZE), seed=5, channels=3, count=7)
    again = SyntheticDefects(images, foregrounds, AnomalySynthesizer(SIZE), seed=5, channels=3, count=7)
    assert defects.images.shape == (7, 3, SIZE, SIZE) and defects.bool_masks().shape == (7, SIZE, SIZE)
    assert torch.equal(defects.images, again.images)
    normal = torch.stack([to_model_range(image, 3) for image in images])
    for j in range(7):  # the j-th defect sits on image j mod 3, untouched outside its mask
        outside = torch.from_numpy(~defects.bool_masks()[j]).expand(3, SIZE, SIZE)
        assert torch.equal(defects.images[j][outside], normal[j % 3][outside])
    assert not torch.equal(defects.masks[0], defects.masks[3])  # same image, another defect


def test_a_gray_model_trains_on_one_channel_made_as_the_exported_graph_makes_it(normal_images):
    images, foregrounds = normal_images
    item = TrainingPairs(images, foregrounds, AnomalySynthesizer(SIZE), seed=1, channels=1)[0, 2]
    assert item["normal"].shape == item["anomalous"].shape == (1, SIZE, SIZE)
    luma = images[2].astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 127.5 - 1  # float64 reference
    assert np.abs(item["normal"][0].numpy() - luma).max() < 1e-5
    validation = ValidationSet(images, foregrounds, AnomalySynthesizer(SIZE), seed=0, channels=1)
    assert validation.normal.shape == validation.anomalous.shape == (3, 1, SIZE, SIZE)


def test_sample_writer_writes_a_panel_per_sample_and_a_grid(tmp_path: Path):
    data = tmp_path / "part"
    for name in ("a", "b", "c"):
        write_png(data / "train" / "good" / f"{name}.png", random_image(ord(name), 80))
    textures = tmp_path / "textures"
    write_png(textures / "t.png", random_image(9, 50))
    written = write_synthetic_samples(data, tmp_path / "out" / "samples", 5, SIZE, textures, "texture", seed=0)
    assert len(written) == 6 and written[-1].name == "grid.png"
    assert sorted((tmp_path / "out" / "samples").iterdir()) == sorted(written)
    panels = [cv2.imread(str(path)) for path in written[:-1]]
    assert all(panel.shape == (SIZE, 4 * SIZE, 3) for panel in panels)
    mask_tiles = [panel[:, 2 * SIZE : 3 * SIZE] for panel in panels]
    assert all(set(np.unique(tile)) <= {0, 255} and tile.max() == 255 for tile in mask_tiles)
    grid = cv2.imread(str(written[-1]))
    assert grid is not None and grid.shape[0] * grid.shape[1] >= 5 * SIZE * 4 * SIZE


@pytest.mark.parametrize(("folder", "mode"), [("bottle/train/good", "object"), ("hazelnut/train/good", "object"),
                                              ("magnetic_tile/train/good", "texture"),
                                              ("dtd/images/chequered", "texture"), ("dtd/images/cracked", "texture")])
def test_auto_foreground_tells_parts_on_a_background_from_textures(datasets_dir, folder, mode):
    from trainer.data.mvtec import list_images, read_rgb

    images = np.stack([read_rgb(p, 128) for p in list_images(datasets_dir / folder)[:40]])
    assert choose_foreground(images)[0] == mode



def test_color_auto_chooses_gray_only_for_pictures_without_colour(datasets_dir):
    rng = np.random.default_rng(0)
    gray = np.repeat(rng.integers(0, 256, (4, 32, 32, 1), dtype=np.uint8), 3, axis=3)
    assert choose_color(gray) == ("gray", 0.0)
    # Sensor noise and JPEG chroma rounding of a few levels, and a small coloured label, stay gray.
    noisy = np.clip(gray.astype(int) + rng.integers(-3, 4, gray.shape), 0, 255).astype(np.uint8)
    noisy[0, :2, :8] = (200, 30, 30)  # 16 of 4096 pixels
    mode, share = choose_color(noisy)
    assert mode == "gray" and 0 < share < 0.01
    hazelnut = np.stack([read_rgb(p, 64) for p in sorted((datasets_dir / "hazelnut" / "train" / "good").iterdir())[:4]])
    assert choose_color(hazelnut)[0] == "rgb"

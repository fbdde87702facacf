import numpy as np
import pytest
import torch

from protocols.one_class import fit_knn
from trainer.config import TrainConfig
from trainer.data.synthesis import AnomalySynthesizer
from trainer.data.training_set import TrainingPairs, to_model_range
from trainer.fused import FusedInference
from trainer.method import MethodConfig
from trainer.model import DiffusionAD
from trainer.profiles import get_profile
from trainer.radar import RadarConstants, feature_window
from trainer.radar_fit import candidate_figures, fit_radar, radar_outputs, responses
from trainer.tiling import Tiling, frame_size, tile_origins
from trainer.training import prepare_data
from trainer.validation import score_images


@pytest.mark.parametrize(("tile", "per_side", "frame"), [(128, 1, 128), (128, 5, 512), (64, 3, 160), (128, 3, 320)])
def test_n_tiles_a_side_cover_the_frame_exactly(tile, per_side, frame):
    assert frame_size(tile, per_side) == frame
    origins = tile_origins(tile, per_side)
    assert len(origins) == per_side ** 2 and max(y for y, _ in origins) + tile == frame


def test_split_then_stitch_of_maps_matches_a_float64_reference():
    tiling = Tiling(8, 3)  # frame 20: stride 6, tiles at 0, 6, 12
    frames = torch.rand(2, 3, 20, 20, dtype=torch.float64)
    tiles = tiling.split(frames.float())
    assert tiles.shape == (9 * 2, 3, 8, 8)
    assert torch.equal(tiles[4 * 2 + 1], frames[1, :, 6:14, 6:14].float())  # tile (1, 1) of frame 1
    maps = torch.rand(18, 8, 8, dtype=torch.float64)
    total, count = np.zeros((2, 20, 20)), np.zeros((20, 20))
    for i, (y, x) in enumerate(tile_origins(8, 3)):
        for b in range(2):
            total[b, y:y + 8, x:x + 8] += maps[i * 2 + b].numpy()
        count[y:y + 8, x:x + 8] += 1
    stitched = tiling.stitch(maps.float())
    assert stitched.shape == (2, 20, 20)
    np.testing.assert_allclose(stitched.numpy(), total / count, rtol=1e-6)
    # a frame cut and stitched back is itself
    torch.testing.assert_close(tiling.stitch(tiling.split(frames.float())), frames.float())


def test_a_tiled_graph_scores_the_frame_from_its_tiles_maps_averaged_where_they_overlap():
    model = DiffusionAD(get_profile("tiny"), tiles_per_side=2).eval()  # tiles of 64 px, frames of 112
    assert model.frame_size == 112
    frames = torch.randint(0, 256, (2, 112, 112, 3), dtype=torch.uint8)
    with torch.no_grad():
        tiled_map, tiled_score = model.fused(MethodConfig())(frames)
        untiled = FusedInference(model.denoiser, model.segmenter, MethodConfig(), 64)
        reference, count = np.zeros((2, 112, 112)), np.zeros((112, 112))  # float64 stitching
        for y, x in tile_origins(64, 2):
            tile_map, _ = untiled(frames[:, y:y + 64, x:x + 64].contiguous())
            reference[:, y:y + 64, x:x + 64] += tile_map.double().numpy()
            count[y:y + 64, x:x + 64] += 1
    reference /= count
    np.testing.assert_allclose(tiled_map.numpy(), reference, atol=1e-5)
    top_k = MethodConfig().top_k
    expected = np.sort(reference.reshape(2, -1), axis=1)[:, -top_k:].mean(axis=1)
    np.testing.assert_allclose(tiled_score.numpy(), expected, atol=1e-5)


def test_training_items_of_a_tiled_model_are_random_tiles_of_its_frames():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    foregrounds = np.ones((3, 112, 112), bool)
    pairs = TrainingPairs(images, foregrounds, AnomalySynthesizer(64), seed=0, channels=3)
    origins = set()
    for epoch in range(4):
        normal = pairs[epoch, 1]["normal"]
        assert normal.shape == (3, 64, 64) and pairs[epoch, 1]["anomalous"].shape == (3, 64, 64)
        frame = to_model_range(images[1], 3)
        found = [(y, x) for y in range(49) for x in range(49) if torch.equal(frame[:, y:y + 64, x:x + 64], normal)]
        assert len(found) == 1
        origins |= set(found)
    assert len(origins) > 1, "a new tile each epoch"
    with pytest.raises(ValueError, match="smaller than the 128 px tiles"):
        TrainingPairs(images, foregrounds, AnomalySynthesizer(128), seed=0, channels=3)


def test_a_tiled_model_is_chosen_on_one_tile_of_each_selection_image_scored_by_the_one_tile_graph(datasets_dir):
    data = prepare_data(datasets_dir / "hazelnut", TrainConfig(profile="tiny", tiles_per_side=2))
    frames, tiles = data.validation.normal, data.selection.normal
    assert frames.shape[-2:] == (112, 112) and tiles.shape == (len(frames), 3, 64, 64)
    assert data.selection.anomalous.shape == tiles.shape and data.selection.masks.shape == (len(frames), 1, 64, 64)
    for frame, tile in zip(frames, tiles):
        assert any(torch.equal(frame[:, y:y + 64, x:x + 64], tile) for y in range(49) for x in range(49))
    model = DiffusionAD(get_profile("tiny"), tiles_per_side=2).eval()
    method = MethodConfig()
    with torch.no_grad():
        _, one_tile = FusedInference(model.denoiser, model.segmenter, method, 64).score(tiles)
        _, whole = model.fused(method).score(frames)
    np.testing.assert_allclose(score_images(model, method, tiles, torch.device("cpu"))[1], one_tile.numpy(), atol=1e-6)
    np.testing.assert_allclose(score_images(model, method, frames, torch.device("cpu"))[1], whole.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="neither frames"):
        score_images(model, method, frames[..., :80, :80], torch.device("cpu"))


def test_an_untiled_model_is_chosen_on_the_selection_images_themselves(datasets_dir):
    data = prepare_data(datasets_dir / "hazelnut", TrainConfig(profile="tiny"))
    assert data.selection is data.validation


def test_a_tiled_models_radar_constants_are_chosen_on_its_selection_tiles_and_its_head_fitted_on_frames(datasets_dir):
    data = prepare_data(datasets_dir / "hazelnut", TrainConfig(profile="tiny", tiles_per_side=2))
    model, method, cpu = DiffusionAD(get_profile("tiny"), tiles_per_side=2).eval(), MethodConfig(), torch.device("cpu")
    record = fit_radar(model, method, data.selection, data.validation, data.calibration, data.calibration_defects,
                       0.01, cpu)
    window = feature_window(64)  # the tile's: tiling keeps the networks' resolution
    first = record["candidates"][:2]  # the smallest noise scale, both discrepancies
    one_tile = model.radar(method, RadarConstants(t=first[0]["t"], discrepancy="residual", window=window,
                                                  map_scale=1.0), on_tiles=True)
    normal = responses(one_tile, data.selection.normal, cpu)
    anomalous = responses(one_tile, data.selection.anomalous, cpu)
    for candidate in first:
        expected = candidate_figures(normal[candidate["discrepancy"]], anomalous[candidate["discrepancy"]],
                                     data.selection.masks[:, 0].numpy() > 0.5, window)
        assert {k: candidate[k] for k in expected} == pytest.approx(expected)
    assert record["candidates_on_tiles"] and record["constants"]["window"] == window
    _, features = radar_outputs(model.radar(method, RadarConstants(**record["constants"])), data.validation.normal, cpu)
    assert len(features) == len(data.validation.normal)
    np.testing.assert_allclose(record["one_class"]["reference"], fit_knn(features)[0].reference, atol=1e-5)

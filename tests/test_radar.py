"""The RADAR head: its filters and features against float64 references (OpenCV's own filters, plain
loops), what it responds to, its one-class decision, and the head a trained run carries."""

import json

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from protocols.one_class import KnnNormalModel, fit_knn
from trainer.diffusion import linear_alpha_bars
from trainer.method import MethodConfig
from trainer.radar import (
    BLUR_KSIZE,
    SOBEL_KSIZE,
    T_CANDIDATES,
    RadarConstants,
    RadarInference,
    binomial_kernel,
    edge_response,
    feature_window,
    image_features,
    sobel_kernels,
    squash,
)


def opencv_edge_response(discrepancy: np.ndarray) -> np.ndarray:
    """The paper's pipeline with OpenCV in float64: GaussianBlur(5, default sigma), Sobel(5) in x and
    y, gradient magnitude over the channels. [B, C, H, W] → [B, H, W]."""
    out = np.zeros((discrepancy.shape[0], *discrepancy.shape[2:]))
    for b, image in enumerate(discrepancy):
        for channel in image:
            blurred = cv2.GaussianBlur(channel, (BLUR_KSIZE, BLUR_KSIZE), 0, borderType=cv2.BORDER_REFLECT_101)
            gx = cv2.Sobel(blurred, cv2.CV_64F, 1, 0, ksize=SOBEL_KSIZE, borderType=cv2.BORDER_REFLECT_101)
            gy = cv2.Sobel(blurred, cv2.CV_64F, 0, 1, ksize=SOBEL_KSIZE, borderType=cv2.BORDER_REFLECT_101)
            out[b] += gx**2 + gy**2
    return np.sqrt(out)


def test_edge_response_is_opencvs_blur_and_sobel_in_float64():
    discrepancy = np.random.default_rng(0).normal(size=(2, 3, 23, 19))
    smooth, derivative = sobel_kernels(SOBEL_KSIZE)
    ours = edge_response(torch.from_numpy(discrepancy), binomial_kernel(BLUR_KSIZE), smooth, derivative)
    np.testing.assert_allclose(ours.numpy(), opencv_edge_response(discrepancy), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ksize", [3, 5, 7])
def test_sobel_factors_are_opencvs(ksize):
    smooth, derivative = sobel_kernels(ksize)
    cv_derivative, cv_smooth = cv2.getDerivKernels(1, 0, ksize)
    np.testing.assert_array_equal(derivative.numpy(), cv_derivative.ravel())
    np.testing.assert_array_equal(smooth.numpy(), cv_smooth.ravel())


def test_image_features_are_the_total_and_the_largest_tile_l2_norm():
    response = np.random.default_rng(1).random((3, 26, 31))
    window = 5
    features = image_features(torch.from_numpy(response), window).numpy()
    for b, r in enumerate(response):
        tiles = [np.sqrt((r[y:y + window, x:x + window] ** 2).sum())
                 for y in range(0, 26 - window + 1, window) for x in range(0, 31 - window + 1, window)]
        assert features[b, 0] == pytest.approx(np.sqrt((r**2).sum()), rel=1e-12)
        assert features[b, 1] == pytest.approx(max(tiles), rel=1e-12)


def test_feature_windows_scale_radars_20_pixels_at_256():
    assert feature_window(256) == 20 and feature_window(128) == 10 and feature_window(8) == 1


def test_squash_is_monotone_into_the_unit_interval_with_the_scale_at_one_half():
    response = torch.tensor([0.0, 0.5, 2.0, 1e6], dtype=torch.float64)
    squashed = squash(response, 2.0)
    assert squashed[0] == 0 and squashed[2] == 0.5 and squashed[-1] < 1
    assert (squashed.diff() > 0).all()


class OracleDenoiser(nn.Module):
    """Knows the normal part exactly: predicts the noise that turns it into the noisy input."""

    def __init__(self, normal: torch.Tensor, alpha_bar: float):
        super().__init__()
        self.normal, self.alpha_bar, self.channels = normal, alpha_bar, normal.shape[1]

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (x_t - self.alpha_bar**0.5 * self.normal) / (1 - self.alpha_bar) ** 0.5


def test_the_residual_discrepancy_lights_up_only_where_the_part_differs_from_what_the_denoiser_knows():
    method, size, t = MethodConfig(), 32, 50
    normal = torch.zeros(1, 3, size, size)
    defective = normal.clone()
    defective[..., 12:20, 12:20] = 0.8
    alpha_bar = float(linear_alpha_bars(method.num_timesteps, method.beta_start, method.beta_end)[t])
    head = RadarInference(OracleDenoiser(normal, alpha_bar), method, size, RadarConstants(
        t=t, discrepancy="residual", window=4, map_scale=1.0))
    assert head.response(normal).abs().max() < 1e-4  # the injected noise cancels exactly
    response = head.response(defective)[0]
    assert response[8:24, 8:24].sum() > 0.999 * response.sum()  # at the patch (its edges), nowhere else
    assert response.max() > 1


def test_the_one_class_score_ranks_an_outlier_above_good_parts_and_ignores_feature_units():
    rng = np.random.default_rng(2)
    good = np.exp(rng.normal([1.0, 0.0], [0.1, 0.2], size=(30, 2)))
    model, own = fit_knn(good)
    outlier = np.array([[np.e * 2, 1.0]])
    assert model.score(outlier)[0] > own.max()
    assert ((own >= 0) & (own < 1)).all() and np.median(own) == pytest.approx(0.5, abs=0.01)
    rescaled, _ = fit_knn(good * [100.0, 0.01])  # other units: same standardised log-features
    np.testing.assert_allclose(rescaled.score(outlier * [100.0, 0.01]), model.score(outlier))
    # leave-one-out: each good image is scored against the others, as the brute force does it
    logs = (np.log(good) - model.center) / model.spread
    for i in (0, 7):
        gaps = np.sort(np.linalg.norm(np.delete(logs, i, axis=0) - logs[i], axis=1))[:model.neighbours]
        assert own[i] == pytest.approx(gaps.mean() / (gaps.mean() + model.scale))
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        model.score(np.ones((3, 3)))


@pytest.fixture(scope="module")
def radar_head(tiny_run):
    from trainer.evaluate import load_run
    from trainer.radar_fit import load_radar

    cfg, model, _ = load_run(tiny_run)
    record = json.loads((tiny_run / "radar.json").read_text())
    head, one_class = load_radar(record, model, cfg.method)
    return head, record, one_class


def test_a_trained_run_carries_a_radar_head_chosen_on_validation_and_calibrated_on_other_images(radar_head, tiny_run):
    head, record, one_class = radar_head
    config = json.loads((tiny_run / "config.json").read_text())["data"]
    assert {(c["t"], c["discrepancy"]) for c in record["candidates"]} == {
        (t, d) for t in T_CANDIDATES for d in ("residual", "predicted")}
    best = max(record["candidates"], key=lambda c: c["selection"])
    assert (record["constants"]["t"], record["constants"]["discrepancy"]) == (best["t"], best["discrepancy"])
    assert len(one_class.reference) == len(config["selection_images"])
    thresholds = record["thresholds"]["false_reject_rate"]
    assert thresholds["calibration_images"] == len(config["calibration_images"])
    assert 0 < thresholds["image"] < 1 and 0 < thresholds["pixel"] < 1


def test_the_radar_graph_is_deterministic_batch_invariant_and_exports_to_the_same_numbers(radar_head, hazelnut_dir):
    head, _, _ = radar_head
    size = head.noise.shape[-1]
    images = torch.from_numpy(np.stack([cv2.resize(cv2.imread(str(p))[..., ::-1], (size, size))
                                        for p in sorted(hazelnut_dir.rglob("*.jpg"))[:4]]))
    with torch.no_grad():
        maps, features = head(images)
        again_maps, again_features = head(images)
        one_maps, one_features = head(images[2:3])
        program = torch.export.export(head, (images,), dynamic_shapes=({0: torch.export.Dim("batch", max=16)},))
        exported_maps, exported_features = program.module()(images)
    assert maps.shape == (4, size, size) and features.shape == (4, 2)
    assert torch.equal(maps, again_maps) and torch.equal(features, again_features)
    torch.testing.assert_close(one_maps[0], maps[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one_features[0], features[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exported_maps, maps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exported_features, features, rtol=1e-5, atol=1e-5)
    assert ((maps >= 0) & (maps < 1)).all()


def test_knn_model_round_trips_through_json(radar_head):
    _, record, one_class = radar_head
    again = KnnNormalModel.model_validate_json(json.dumps(record["one_class"]))
    features = np.array([[1.0, 0.5], [50.0, 9.0]])
    np.testing.assert_array_equal(again.score(features), one_class.score(features))


def test_a_run_from_before_the_radar_head_gets_the_same_head_fitted_at_evaluation(tiny_run, tmp_path, capsys):
    import shutil

    from trainer.evaluate import load_run, radar_record

    old = tmp_path / "old-run"
    shutil.copytree(tiny_run, old)
    (old / "radar.json").unlink()
    cfg, model, _ = load_run(old)
    record = radar_record(old, cfg, model)
    assert "fitting the RADAR head" in capsys.readouterr().out
    trained = json.loads((tiny_run / "radar.json").read_text())
    # The same choice from the same held-out images (the training process ran it in channels-last
    # memory, so the last digits differ).
    assert record["constants"] == {**trained["constants"],
                                   "map_scale": pytest.approx(trained["constants"]["map_scale"], rel=1e-4)}
    for policy in ("false_reject_rate", "max_f1"):
        for key in ("image", "pixel"):
            assert record["thresholds"][policy][key] == pytest.approx(trained["thresholds"][policy][key], rel=1e-3)
    assert json.loads((old / "radar.json").read_text()) == record

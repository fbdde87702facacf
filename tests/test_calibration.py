import json

import numpy as np
import pytest

from trainer.evaluation.calibration import (Thresholds, calibrate, threshold_for_false_reject_rate,
                                            threshold_max_f1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rate", [0.0, 0.01, 0.05, 0.29, 0.5])
@pytest.mark.parametrize("ties", [False, True])
def test_false_reject_threshold_fails_at_most_the_rate_and_is_the_smallest_such(dtype, rate, ties):
    scores = np.random.default_rng(0).random(1000).astype(dtype)
    if ties:
        scores = np.round(scores * 20).astype(dtype)
    threshold = threshold_for_false_reject_rate(scores, rate)
    assert np.mean(scores >= threshold) <= rate
    # the next smaller value in the scores' precision fails more than the rate
    just_below = np.nextafter(dtype(threshold), -np.inf)
    assert np.mean(scores >= just_below) > rate
    # an edge device comparing in the scores' precision gives the same verdicts
    assert np.array_equal(scores >= dtype(threshold), scores >= threshold)


@pytest.mark.parametrize("rate", [0.07, 0.29, 0.57])  # rate * 100 is not a whole number in floating point
def test_false_reject_rate_of_a_whole_number_of_samples_is_met_exactly(rate):
    scores = np.random.default_rng(0).random(100)
    assert np.mean(scores >= threshold_for_false_reject_rate(scores, rate)) == rate


def test_false_reject_rate_zero_is_just_above_the_largest_normal_score():
    scores = np.array([0.2, 0.7, 0.5])
    assert threshold_for_false_reject_rate(scores, 0.0) == np.nextafter(0.7, np.inf)


@pytest.mark.parametrize("rate", [-0.01, 1.0, 1.5])
def test_false_reject_rate_outside_zero_to_one_is_rejected(rate):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        threshold_for_false_reject_rate(np.array([0.1, 0.2]), rate)


def test_max_f1_threshold_on_a_hand_checked_case():
    labels = np.array([False, False, True, True, True])
    scores = np.array([0.1, 0.6, 0.4, 0.7, 0.9])
    assert threshold_max_f1(labels, scores) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="both"):
        threshold_max_f1(np.zeros(3, bool), np.array([0.1, 0.2, 0.3]))


def validation_data():
    rng = np.random.default_rng(0)
    normal_scores = rng.random(40)
    normal_maps = rng.random((40, 16, 16)) * 0.4
    anomalous_masks = np.zeros((10, 16, 16), bool)
    anomalous_masks[:, 4:9, 5:11] = True
    anomalous_maps = rng.random((10, 16, 16)) * 0.4 + anomalous_masks * 0.6
    anomalous_scores = rng.random(10) + 0.8
    return normal_scores, normal_maps, anomalous_scores, anomalous_maps, anomalous_masks


def test_calibrate_by_false_reject_rate_uses_normals_only():
    normal_scores, normal_maps, *_ = validation_data()
    thresholds = calibrate("false_reject_rate", normal_scores, normal_maps, false_reject_rate=0.05)
    assert thresholds.policy == "false_reject_rate"
    assert thresholds.target_false_reject_rate == 0.05
    assert thresholds.calibration_images == 40
    assert np.mean(normal_scores >= thresholds.image) == 0.05  # 2 of 40
    assert 0.045 < np.mean(normal_maps >= thresholds.pixel) <= 0.05


def test_calibrate_by_max_f1_uses_the_labelled_defects():
    normal_scores, normal_maps, anomalous_scores, anomalous_maps, anomalous_masks = validation_data()
    thresholds = calibrate("max_f1", normal_scores, normal_maps, anomalous_scores, anomalous_maps,
                           anomalous_masks)
    assert thresholds.policy == "max_f1" and thresholds.target_false_reject_rate is None
    assert thresholds.calibration_images == 50
    labels = np.r_[np.zeros(40, bool), np.ones(10, bool)]
    assert thresholds.image == threshold_max_f1(labels, np.r_[normal_scores, anomalous_scores])
    # the pixels separate perfectly, so F1 is 1 at the lowest defect pixel's score
    assert thresholds.pixel == pytest.approx(anomalous_maps[anomalous_masks].min())


def test_calibrate_by_max_f1_without_defects_names_what_is_missing():
    normal_scores, normal_maps, anomalous_scores, anomalous_maps, _ = validation_data()
    with pytest.raises(ValueError, match="anomalous_masks") as error:
        calibrate("max_f1", normal_scores, normal_maps, anomalous_scores, anomalous_maps)
    assert "anomalous_scores" not in str(error.value)
    with pytest.raises(ValueError, match="unknown threshold policy"):
        calibrate("f2", normal_scores, normal_maps)


def test_thresholds_round_trip_through_json():
    thresholds = Thresholds(image=0.61, pixel=0.42, policy="false_reject_rate", target_false_reject_rate=0.01,
                            calibration_images=40)
    assert Thresholds.from_dict(json.loads(json.dumps(thresholds.to_dict()))) == thresholds
    with pytest.raises(ValueError, match="policy"):
        Thresholds.from_dict({**thresholds.to_dict(), "policy": "median"})

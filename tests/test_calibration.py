import json

import numpy as np
import pytest

from scipy import stats

from trainer.evaluation.calibration import (MIN_SYNTHETIC_CATCH, DetectionCeiling, Thresholds, calibrate,
                                            catching_threshold, conformal_rank, conformal_threshold,
                                            estimate_threshold, logit_normal_rate_at, logit_normal_threshold,
                                            threshold_max_f1)


@pytest.mark.parametrize(("n", "rate", "rank"), [(99, 0.01, 99), (98, 0.01, None), (19, 0.05, 19),
                                                 (40, 0.05, 39), (100, 0.1, 91), (20, 0.01, None)])
def test_conformal_rank_is_the_finite_sample_quantile(n, rate, rank):
    assert conformal_rank(n, rate) == rank


def test_conformal_threshold_passes_the_kth_score_in_float32():
    scores = np.random.default_rng(0).random(40)
    estimate = conformal_threshold(scores, 0.05)  # k = ceil(41 * 0.95) = 39: the highest fails
    assert estimate.estimator == "conformal" and estimate.images == 40
    assert np.sum(scores >= estimate.threshold) == 1
    assert np.array_equal(scores.astype(np.float32) >= np.float32(estimate.threshold), scores >= estimate.threshold)
    assert estimate.expected_rate == pytest.approx(2 / 41)
    assert estimate.expected_rate < estimate.upper_rate


def realised_rates(estimator, distribution, n: int, rate: float, trials: int = 400):
    """The false-reject rate each calibrated threshold gives on the whole (known) distribution."""
    rng = np.random.default_rng(1)
    estimates = [estimator(distribution.rvs(n, random_state=rng), rate) for _ in range(trials)]
    return np.array([distribution.sf(e.threshold) for e in estimates]), estimates


@pytest.mark.parametrize(("estimator", "n", "rate"), [(conformal_threshold, 120, 0.05),
                                                      (logit_normal_threshold, 20, 0.01),
                                                      (logit_normal_threshold, 60, 0.05)])
def test_the_stated_rate_and_its_upper_bound_hold_on_new_parts(estimator, n, rate):
    """Scores whose logits are normal (so both estimators' assumptions hold): averaged over many
    calibrations, the rate on new good parts is what was promised, and it stays under the stated
    90 % bound about 90 % of the time."""
    good = stats.johnsonsb(0.0, 1.0, loc=0.0, scale=1.0)  # logit(score) ~ N(0, 1), score in (0, 1)
    rates, estimates = realised_rates(estimator, good, n, rate)
    assert rates.mean() <= rate * 1.15
    assert rates.mean() == pytest.approx(np.mean([e.expected_rate for e in estimates]), rel=0.2)
    assert 0.85 <= np.mean(rates <= np.array([e.upper_rate for e in estimates])) <= 0.95


def test_logit_normal_threshold_matches_a_float64_reference():
    scores = np.array([0.05, 0.12, 0.08, 0.2, 0.1, 0.07, 0.15])
    logits = np.log(scores / (1 - scores))
    n, mean, sd = len(scores), logits.mean(), logits.std(ddof=1)
    reference = 1 / (1 + np.exp(-(mean + sd * np.sqrt(1 + 1 / n) * stats.t.ppf(0.99, n - 1))))
    estimate = logit_normal_threshold(scores, 0.01)
    assert estimate.threshold == pytest.approx(reference, rel=1e-6)
    assert estimate.expected_rate == pytest.approx(0.01, rel=0.1)  # the predictive quantile: rate on average


def test_estimate_threshold_is_conformal_only_with_enough_images():
    rng = np.random.default_rng(0)
    assert estimate_threshold(rng.random(99), 0.01).estimator == "conformal"
    assert estimate_threshold(rng.random(98), 0.01).estimator == "logit-normal"


@pytest.mark.parametrize("rate", [0.0, -0.01, 1.0, 1.5])
def test_false_reject_rate_outside_zero_to_one_is_rejected(rate):
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        estimate_threshold(np.array([0.1, 0.2]), rate)


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
    assert thresholds.calibration_images == 40 and thresholds.estimator == "conformal"
    assert np.sum(normal_scores >= thresholds.image) == 1  # conformal with 40 images: the highest fails
    # the pixel threshold flags a pixel in as few good images: the others show no defect at all
    assert np.sum(normal_maps.max(axis=(1, 2)) >= thresholds.pixel) == 1
    assert thresholds.too_few_images() is None
    few = calibrate("false_reject_rate", normal_scores[:10], normal_maps[:10], false_reject_rate=0.05)
    assert few.estimator == "logit-normal" and "10 calibration images are too few" in few.too_few_images()


def test_the_rate_at_a_given_threshold_is_the_rate_the_fit_states_for_its_own_threshold():
    scores = np.random.default_rng(3).beta(2, 8, 12)
    fitted = logit_normal_threshold(scores, 0.01)
    at = logit_normal_rate_at(scores, fitted.threshold)
    assert at.expected_rate == pytest.approx(fitted.expected_rate, rel=1e-3)
    assert at.upper_rate == pytest.approx(fitted.upper_rate, rel=1e-3)
    lower = logit_normal_rate_at(scores, 0.5 * fitted.threshold)
    assert lower.threshold == 0.5 * fitted.threshold and lower.expected_rate > 5 * fitted.expected_rate


def test_catching_threshold_is_the_highest_that_fails_the_share():
    scores = np.arange(10) / 10  # 0.0 ... 0.9: failing 9 of them leaves 0.0 passing
    assert catching_threshold(scores, 0.9) == catching_threshold(scores, 0.85) == pytest.approx(0.1)
    assert catching_threshold(scores, 1.0) == 0.0
    for share in (0.5, 0.9, 0.97):
        scores = np.random.default_rng(1).random(37)
        threshold = catching_threshold(scores, share)
        assert np.mean(scores >= threshold) >= share
        lowest_failing = scores[scores >= threshold].min()
        assert threshold <= lowest_failing < threshold + 1e-7  # float32 just below a score
        assert np.mean(scores > lowest_failing) < share  # any higher threshold fails fewer


def test_the_pixel_ceiling_looks_inside_each_synthetic_defect_only():
    rng = np.random.default_rng(0)
    masks = np.zeros((20, 8, 8), bool)
    masks[:, 2:5, 2:5] = True
    maps = rng.random((20, 8, 8)) * 0.5
    maps[:, 7, 7] = 0.99  # a bright corner outside every defect
    ceiling = DetectionCeiling.from_synthetic(rng.random(20), maps, masks)
    peaks = np.array([m[2:5, 2:5].max() for m in maps], dtype=np.float64)  # float64 reference
    assert ceiling.pixel == pytest.approx(np.sort(peaks)[20 - 18], rel=1e-6)


def few_good_scores_and_far_defects():
    rng = np.random.default_rng(2)
    good = 1 / (1 + np.exp(-rng.normal(-1.0, 1.0, 6)))  # hazelnut-like: 6 good images, wide logits
    maps = np.repeat(good[:, None, None], 4, axis=1).repeat(4, axis=2)
    return good, maps, DetectionCeiling(image=0.7, pixel=0.72)


def test_a_threshold_extrapolated_from_few_images_is_capped_to_keep_catching_synthetic_defects():
    good, maps, ceiling = few_good_scores_and_far_defects()
    uncapped = calibrate("false_reject_rate", good, maps)
    assert uncapped.image > ceiling.image and uncapped.limited_by == "false_reject_rate"
    capped = calibrate("false_reject_rate", good, maps, ceiling=ceiling)
    assert (capped.image, capped.pixel, capped.limited_by) == (ceiling.image, ceiling.pixel, "synthetic_defects")
    assert capped.ceiling() == ceiling
    # the rate stated is the fit's rate at the cap, above the target, and said so
    assert capped.expected_false_reject_rate == logit_normal_rate_at(good, ceiling.image).expected_rate > 0.01
    warning = capped.too_few_images()
    assert f"catch {MIN_SYNTHETIC_CATCH:.0%} of them" in warning and f"{capped.expected_false_reject_rate:.1%}" in warning


def test_a_threshold_below_the_ceiling_or_observed_on_enough_images_is_not_capped():
    good, maps, ceiling = few_good_scores_and_far_defects()
    high = DetectionCeiling(image=0.999, pixel=0.999)
    assert calibrate("false_reject_rate", good, maps, ceiling=high).limited_by == "false_reject_rate"
    many = np.random.default_rng(4).uniform(0.5, 0.9, 120)  # conformal: the rate is observed, the target holds
    thresholds = calibrate("false_reject_rate", many, many[:, None, None], ceiling=ceiling)
    assert thresholds.estimator == "conformal" and thresholds.image > ceiling.image
    assert thresholds.limited_by == "false_reject_rate" and thresholds.detection_ceiling_image == ceiling.image


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
                            calibration_images=40, estimator="logit-normal", expected_false_reject_rate=0.0102,
                            false_reject_rate_upper=0.021, limited_by="synthetic_defects",
                            detection_ceiling_image=0.61, detection_ceiling_pixel=0.5)
    assert Thresholds.from_dict(json.loads(json.dumps(thresholds.to_dict()))) == thresholds
    with pytest.raises(ValueError, match="policy"):
        Thresholds.from_dict({**thresholds.to_dict(), "policy": "median"})

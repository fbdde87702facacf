import json
import warnings

import cv2
import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import (accuracy_score, average_precision_score, confusion_matrix,
                             precision_recall_fscore_support, roc_auc_score)

from trainer.evaluation.metrics import (aupro, compute_metrics, image_auroc, max_f1, pixel_ap, pixel_auroc,
                                        resize_for_metrics, subsample_indices, verdict_metrics)


def reference_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """The definition, evaluated slowly at every distinct map value."""
    regions = []  # (image index, region mask)
    for index, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(index, labelled == k) for k in range(1, count + 1)]
    points = [(0.0, 0.0)]
    for threshold in np.unique(maps)[::-1]:
        above = maps >= threshold
        pro = np.mean([above[index][region].mean() for index, region in regions])
        points.append((above[~masks].mean(), pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def random_masks_and_maps(seed: int, count: int = 5, size: int = 16, levels: int | None = None):
    """Speckled masks (many components, diagonal contacts, some images empty) and partly informative maps."""
    rng = np.random.default_rng(seed)
    masks = rng.random((count, size, size)) < 0.12
    masks[rng.random(count) < 0.3] = False
    masks[0] = False
    masks[1, 3:8, 4:9] = True
    maps = rng.random(masks.shape) + 0.6 * masks * rng.random(masks.shape)
    if levels:  # coarse values, so normal and defect pixels tie
        maps = np.round(maps * levels) / levels
    return masks, maps


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("levels", [None, 12])
def test_aupro_equals_its_definition(seed, levels):
    masks, maps = random_masks_and_maps(seed, levels=levels)
    assert aupro(masks, maps) == pytest.approx(reference_aupro(masks, maps), abs=1e-9)


def test_aupro_at_another_fpr_limit_equals_its_definition():
    masks, maps = random_masks_and_maps(7)
    assert aupro(masks, maps, fpr_limit=0.05) == pytest.approx(reference_aupro(masks, maps, 0.05), abs=1e-9)


def test_aupro_regions_are_8_connected():
    mask = np.zeros((8, 8), bool)
    mask[2, 2] = mask[2, 3] = mask[3, 2] = True  # an L
    mask[4, 3] = True  # touches the L only diagonally: the same region
    anomaly_map = np.zeros((8, 8))
    anomaly_map[mask] = 0.5
    anomaly_map[4, 3] = 1.0
    anomaly_map.ravel()[np.flatnonzero(~mask)[:6]] = 0.8  # 6 of the 60 normal pixels
    # curve (0, 0) → (0, 1/4) → (0.1, 1/4) → (0.1, 1) → (1, 1); two regions would give PRO 1/2
    expected = (0.1 * 0.25 + 0.2 * 1.0) / 0.3
    assert aupro(mask[None], anomaly_map[None]) == pytest.approx(expected, abs=1e-12)


def test_aupro_is_one_for_perfect_maps_and_zero_for_inverted_ones():
    masks, _ = random_masks_and_maps(4)
    assert aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0, abs=1e-12)
    assert aupro(masks, 1.0 - masks) == pytest.approx(0.0, abs=1e-12)


def test_pixel_and_image_metrics_match_sklearn():
    labels = np.array([False, False, True, True])
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    assert image_auroc(labels, scores) == pytest.approx(0.75)
    masks, maps = random_masks_and_maps(5)
    assert pixel_ap(masks, maps) == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()))
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))


def test_max_f1_on_a_hand_checked_case():
    labels = np.array([False, False, True, True, True])
    scores = np.array([0.1, 0.6, 0.4, 0.7, 0.9])
    # at 0.4: 3 true positives, 1 false positive → precision 3/4, recall 1, F1 6/7 (the best)
    f1, threshold = max_f1(labels, scores)
    assert f1 == pytest.approx(6 / 7)
    assert threshold == pytest.approx(0.4)


def small_test_set():
    defects = ["good", "scratch", "good", "crack", "scratch", "crack", "good"]
    labels = np.array([d != "good" for d in defects])
    scores = np.array([0.2, 0.9, 0.5, 0.3, 0.7, 0.6, 0.1])
    rng = np.random.default_rng(0)
    masks = np.zeros((7, 16, 16), bool)
    for index in np.flatnonzero(labels):
        masks[index, 4 + index:9 + index, 3:8] = True
    maps = rng.random(masks.shape) + masks * np.linspace(0.1, 1.0, 7)[:, None, None]
    return labels, scores, masks, maps, defects


def test_compute_metrics_overall_and_per_defect_subsets():
    labels, scores, masks, maps, defects = small_test_set()
    result = compute_metrics(labels, scores, masks, maps, defects)
    keys = {"image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_f1_max", "image_f1_threshold", "num_images"}
    assert set(result) == keys | {"per_defect"}
    assert result["num_images"] == 7
    assert result["aupro"] == pytest.approx(aupro(masks, maps))
    assert set(result["per_defect"]) == {"crack", "scratch"}
    for defect, images in (("scratch", [0, 1, 2, 4, 6]), ("crack", [0, 2, 3, 5, 6])):
        entry = result["per_defect"][defect]
        assert set(entry) == keys
        assert entry["num_images"] == len(images)
        assert entry["image_auroc"] == pytest.approx(image_auroc(labels[images], scores[images]))
        assert entry["pixel_ap"] == pytest.approx(pixel_ap(masks[images], maps[images]))
        assert entry["aupro"] == pytest.approx(aupro(masks[images], maps[images]))
    # the subsets really differ: scratch is separable, crack is not
    assert result["per_defect"]["scratch"]["image_auroc"] == 1.0
    assert result["per_defect"]["crack"]["image_auroc"] < 1.0
    assert all(type(v) in (float, int) for v in result["per_defect"]["crack"].values())
    json.dumps(result)


def test_degenerate_input_gives_nan_without_errors_or_warnings():
    masks = np.zeros((3, 8, 8), bool)
    maps = np.random.default_rng(0).random((3, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = compute_metrics(np.zeros(3, bool), np.array([0.1, 0.2, 0.3]), masks, maps, ["good"] * 3)
    assert result["per_defect"] == {}
    assert result["num_images"] == 3
    for key in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_f1_max", "image_f1_threshold"):
        assert np.isnan(result[key]), key
    assert np.isnan(aupro(np.ones((1, 4, 4), bool), np.ones((1, 4, 4))))  # no normal pixels


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match="masks and maps"):
        pixel_ap(np.zeros((2, 8, 8), bool), np.zeros((2, 8, 9)))
    labels, scores, masks, maps, defects = small_test_set()
    with pytest.raises(ValueError, match="defect type"):
        compute_metrics(labels, scores, masks, maps, defects[:-1])


def test_resize_for_metrics_resizes_maps_bilinearly_and_binarises_masks():
    rng = np.random.default_rng(0)
    maps = rng.random((2, 64, 48)).astype(np.float32)
    resized = resize_for_metrics(maps, 32)
    assert resized.shape == (2, 32, 32) and resized.dtype == np.float32
    np.testing.assert_allclose(resized[1], cv2.resize(maps[1], (32, 32), interpolation=cv2.INTER_LINEAR))
    # halving averages 2×2 blocks: covered by 4, 3, 1 and 0 of their pixels
    masks = np.zeros((1, 4, 4), bool)
    masks[0, :2, :2] = True
    masks[0, :2, 2:] = [[True, True], [True, False]]
    masks[0, 2:, :2] = [[True, False], [False, False]]
    resized_masks = resize_for_metrics(masks, 2)
    assert resized_masks.dtype == bool
    np.testing.assert_array_equal(resized_masks[0], [[True, True], [False, False]])


def test_subsample_indices_are_fixed_sorted_and_distinct():
    first = subsample_indices(10_000, 500)
    assert len(first) == 500 and len(np.unique(first)) == 500
    assert np.all(np.diff(first) > 0)
    np.testing.assert_array_equal(first, subsample_indices(10_000, 500))
    np.testing.assert_array_equal(subsample_indices(20, 500), np.arange(20))


def test_verdict_metrics_on_a_hand_counted_case():
    defects = ["good"] * 4 + ["scratch"] * 3 + ["crack"] * 2
    labels = np.array([d != "good" for d in defects])
    fails = np.array([False, True, False, False, True, True, False, True, False])
    result = verdict_metrics(labels, fails, defects)
    assert result["counts"] == {"true_pass": 3, "false_reject": 1, "escape": 2, "true_fail": 3}
    assert result["accuracy"] == pytest.approx(6 / 9)
    assert result["precision"] == pytest.approx(3 / 4)  # 3 of the 4 rejected parts were defective
    assert result["recall"] == pytest.approx(3 / 5)
    assert result["f1"] == pytest.approx(2 / 3)  # 2 · 0.75 · 0.6 / 1.35
    assert result["false_reject_rate"] == pytest.approx(1 / 4)
    assert result["escape_rate"] == pytest.approx(2 / 5)
    assert result["per_defect"] == {
        "crack": {"images": 2, "caught": 1, "escape_rate": 0.5},
        "good": {"images": 4, "rejected": 1, "false_reject_rate": 0.25},
        "scratch": {"images": 3, "caught": 2, "escape_rate": pytest.approx(1 / 3)},
    }
    json.dumps(result)


def assert_ratio(got: float | None, expected: float) -> None:
    """sklearn's NaN (with zero_division=nan) is our None."""
    assert got is None if np.isnan(expected) else got == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(6))
# the last three: no defective images, nothing failed, neither (F1 undefined too)
@pytest.mark.parametrize(("defective", "failing"), [(0.6, 0.5), (0.1, 0.9), (1.0, 1.0), (0.0, 0.3), (0.7, 0.0),
                                                    (0.0, 0.0)])
def test_verdict_metrics_match_sklearn(seed, defective, failing):
    rng = np.random.default_rng(seed)
    labels = rng.random(40) < defective
    fails = rng.random(40) < failing
    defects = np.where(labels, rng.choice(["crack", "scratch"], 40), "good")
    result = verdict_metrics(labels, fails, defects.tolist())
    true_pass, false_reject, escape, true_fail = confusion_matrix(labels, fails, labels=[False, True]).ravel()
    assert result["counts"] == {"true_pass": true_pass, "false_reject": false_reject, "escape": escape,
                                "true_fail": true_fail}
    precision, recall, f1, _ = precision_recall_fscore_support(labels, fails, average="binary",
                                                               zero_division=np.nan)
    assert_ratio(result["precision"], precision)
    assert_ratio(result["recall"], recall)
    assert_ratio(result["f1"], f1)
    assert_ratio(result["accuracy"], accuracy_score(labels, fails))
    # the two rates are 1 − sklearn's recalls: of "pass" on good images, of "fail" on defective ones
    good_recall = precision_recall_fscore_support(~labels, ~fails, average="binary", zero_division=np.nan)[1]
    assert_ratio(result["false_reject_rate"], 1 - good_recall)
    assert_ratio(result["escape_rate"], 1 - recall)
    for defect, entry in result["per_defect"].items():
        assert entry["images"] == np.sum(defects == defect)
        if defect == "good":
            assert entry["rejected"] == false_reject
        else:
            assert entry["caught"] == np.sum(fails[defects == defect])
            assert entry["escape_rate"] == pytest.approx(1 - entry["caught"] / entry["images"])


@pytest.mark.parametrize("case", ["no images", "only good, none failed", "only defective, all passed"])
def test_undefined_verdict_ratios_are_none_without_errors_or_warnings(case):
    count = {"no images": 0}.get(case, 5)
    labels = np.full(count, case == "only defective, all passed")
    defects = ["crack" if label else "good" for label in labels]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = verdict_metrics(labels, np.zeros(count, bool), defects)
    undefined = {"no images": {"accuracy", "precision", "recall", "f1", "false_reject_rate", "escape_rate"},
                 "only good, none failed": {"precision", "recall", "f1", "escape_rate"},
                 "only defective, all passed": {"precision", "false_reject_rate"}}[case]
    ratios = {key: value for key, value in result.items() if key not in ("counts", "per_defect")}
    assert {key for key, value in ratios.items() if value is None} == undefined
    assert all(type(value) is float for key, value in ratios.items() if key not in undefined)
    assert json.loads(json.dumps(result)) == result  # no NaN anywhere


def test_verdict_metrics_reject_inconsistent_input():
    with pytest.raises(ValueError, match="one label, verdict and defect type"):
        verdict_metrics(np.zeros(3, bool), np.zeros(2, bool), ["good"] * 3)
    with pytest.raises(ValueError, match="both normal and defective"):
        verdict_metrics(np.array([False, True]), np.zeros(2, bool), ["good", "good"])

"""The metrics the field reports (METHOD.md "Evaluation"), as pure functions over numpy arrays.

All metrics are in [0, 1]. A metric that is undefined on its input (only one class present: no
defective images, no defective pixels, or no normal ones) is NaN rather than an error; callers
serialise NaN as null. The verdict ratios (verdict_metrics) are None when undefined, ready for JSON.
"""

from collections.abc import Sequence

import cv2
import numpy as np
from scipy import ndimage
from scipy.integrate import trapezoid
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

METRIC_SIZE = 256  # the field reports pixel metrics at 256²


def resize_for_metrics(images: np.ndarray, size: int = METRIC_SIZE) -> np.ndarray:
    """Resize [N,H,W] maps or masks to [N,size,size] the way the field does before scoring.

    Float maps are resized bilinearly (no smoothing) to float32; bool masks are resized the same
    way and binarised at 0.5, staying bool.
    """
    if images.ndim != 3:
        raise ValueError(f"expected [N,H,W] maps or masks, got shape {images.shape}")
    is_mask = images.dtype == bool
    # cv2 has no float16 or bool resize
    resized = np.stack([cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
                        for image in images.astype(np.float32, copy=False)])
    return resized > 0.5 if is_mask else resized


def _both_classes(labels: np.ndarray) -> bool:
    return bool(labels.any()) and not bool(labels.all())


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(roc_auc_score(labels, scores)) if _both_classes(labels) else float("nan")


def _average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(average_precision_score(labels, scores)) if _both_classes(labels) else float("nan")


def _check_images(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, scores = np.asarray(labels, dtype=bool), np.asarray(scores)
    if labels.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"labels and scores must both be [N]; got {labels.shape} and {scores.shape}")
    return labels, scores


def _check_pixels(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    masks, maps = np.asarray(masks, dtype=bool), np.asarray(maps)
    if masks.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(f"masks and maps must both be [N,H,W]; got {masks.shape} and {maps.shape}")
    if not np.isfinite(maps).all():
        raise ValueError("anomaly maps contain NaN or infinite values")
    return masks, maps


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of image scores; labels are True for defective images."""
    return _auroc(*_check_images(labels, scores))


def image_ap(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision of image scores."""
    return _average_precision(*_check_images(labels, scores))


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """Area under the ROC curve over all pixels of all images."""
    masks, maps = _check_pixels(masks, maps)
    return _auroc(masks.ravel(), maps.ravel())


def pixel_ap(masks: np.ndarray, maps: np.ndarray) -> float:
    """Average precision over all pixels of all images."""
    masks, maps = _check_pixels(masks, maps)
    return _average_precision(masks.ravel(), maps.ravel())


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to a false positive rate (MVTec AD).

    Regions are the 8-connected components of each image's mask. At a threshold t, PRO is the mean
    over all regions of the fraction of the region's pixels with map >= t, and FPR is the fraction
    of all normal pixels with map >= t. PRO is integrated over FPR in [0, fpr_limit] (trapezoids,
    the curve interpolated at fpr_limit) at every distinct map value, then divided by fpr_limit.
    NaN if there are no regions or no normal pixels.
    """
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    masks, maps = _check_pixels(masks, maps)
    # a 3-D structure that is 8-connected within an image and never connects across images
    within_image = np.zeros((3, 3, 3), dtype=bool)
    within_image[1] = True
    regions, region_count = ndimage.label(masks, structure=within_image)
    regions = regions.ravel()  # 0 = normal pixel, 1..region_count = region id
    defect = regions > 0
    normal_count = int(defect.size - np.count_nonzero(defect))
    if region_count == 0 or normal_count == 0:
        return float("nan")

    # A pixel of region r raises that region's overlap by 1/size_r, and PRO averages over regions,
    # so PRO(t) is a plain sum of per-pixel weights over the defect pixels >= t.
    pro_weight = 1.0 / (region_count * np.bincount(regions))  # index 0 (normal) is never used
    scores = maps.ravel()
    descending = np.argsort(scores[defect])[::-1]
    defect_scores = scores[defect][descending]
    pro_from_top = np.cumsum(pro_weight[regions[defect][descending]])
    # PRO only changes at defect scores, so between two of them the curve is a horizontal step and
    # two points per distinct defect score t describe it exactly: one just above t (normals > t,
    # PRO of the higher defect scores) and one at t (normals >= t, PRO including t).
    last_of_ties = np.append(np.flatnonzero(defect_scores[1:] != defect_scores[:-1]), defect_scores.size - 1)
    thresholds = defect_scores[last_of_ties]
    pro_at = pro_from_top[last_of_ties]
    pro_above = np.r_[0.0, pro_at[:-1]]
    normal_sorted = np.sort(scores[~defect])
    fpr_above = (normal_count - np.searchsorted(normal_sorted, thresholds, side="right")) / normal_count
    fpr_at = (normal_count - np.searchsorted(normal_sorted, thresholds, side="left")) / normal_count
    # from (0, 0), through both points of each threshold, to all pixels flagged
    fpr = np.r_[0.0, np.column_stack([fpr_above, fpr_at]).ravel(), 1.0]
    pro = np.r_[0.0, np.column_stack([pro_above, pro_at]).ravel(), pro_at[-1]]

    within = int(np.searchsorted(fpr, fpr_limit, side="right"))  # fpr is non-decreasing, fpr[0] = 0
    fpr, pro = fpr[: within + 1], pro[: within + 1]
    if fpr[-1] > fpr_limit:
        pro[-1] = np.interp(fpr_limit, fpr[-2:], pro[-2:])
        fpr[-1] = fpr_limit
    return float(trapezoid(pro, fpr) / fpr_limit)


def max_f1(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(best F1, the threshold achieving it), where score >= threshold means defective.

    (NaN, NaN) if only one class is present.
    """
    labels, scores = _check_images(labels, scores)
    if not _both_classes(labels):
        return float("nan"), float("nan")
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    # the last (precision 1, recall 0) point has no threshold
    precision, recall = precision[:-1], recall[:-1]
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def subsample_indices(count: int, limit: int) -> np.ndarray:
    """Sorted indices of a fixed pseudo-random subset of range(count) of size `limit`, or all of them.

    Random rather than strided so that a stride cannot line up with the image width.
    """
    if count <= limit:
        return np.arange(count)
    return np.sort(np.random.default_rng(0).choice(count, size=limit, replace=False))


def _metrics_on(labels: np.ndarray, scores: np.ndarray, masks: np.ndarray, maps: np.ndarray) -> dict:
    f1, f1_threshold = max_f1(labels, scores)
    return {
        "image_auroc": image_auroc(labels, scores),
        "pixel_auroc": pixel_auroc(masks, maps),
        "aupro": aupro(masks, maps),
        "pixel_ap": pixel_ap(masks, maps),
        "image_f1_max": f1,
        "image_f1_threshold": f1_threshold,
        "num_images": len(labels),
    }


def compute_metrics(labels: np.ndarray, scores: np.ndarray, masks: np.ndarray, maps: np.ndarray,
                    defect_types: Sequence[str]) -> dict:
    """All reported metrics on a labelled test set, overall and per defect type.

    labels bool [N] (True = defective), scores [N], masks bool [N,H,W], maps float [N,H,W] already
    at the metric size (see resize_for_metrics), defect_types [N] (the defect name of each image;
    ignored for normal images). Each per-defect entry is computed on that defect's images plus all
    normal images. Values are plain floats (num_images an int); undefined ones are NaN.
    """
    labels, scores = _check_images(labels, scores)
    masks, maps = _check_pixels(masks, maps)
    defect_types = np.asarray(defect_types)
    if not len(labels) == len(masks) == len(defect_types):
        raise ValueError(f"need one label, score, mask, map and defect type per image; got {len(labels)} "
                         f"labels, {len(masks)} masks and {len(defect_types)} defect types")
    result = _metrics_on(labels, scores, masks, maps)
    result["per_defect"] = {}
    for defect in sorted(set(defect_types[labels].tolist())):
        subset = (defect_types == defect) | ~labels
        result["per_defect"][defect] = _metrics_on(labels[subset], scores[subset], masks[subset], maps[subset])
    return result


def _ratio(part: int, whole: int) -> float | None:
    """part / whole, or None when there is nothing to divide by (undefined, which is not 0)."""
    return part / whole if whole else None


def verdict_metrics(labels: np.ndarray, fails: np.ndarray, defect_types: Sequence[str]) -> dict:
    """How pass/fail verdicts at one threshold compare with the truth, as a plant counts them.

    labels bool [N] (True = defective), fails bool [N] (True = the part was rejected), defect_types
    [N]. Counts: true_pass (good passed), false_reject (good failed), escape (defective passed),
    true_fail (defective failed). Precision and recall are those of the fail verdict, F1 is
    2·true_fail / (2·true_fail + false_reject + escape). per_defect gives, for each type of normal
    images (e.g. "good"), how many were rejected and the false reject rate, and for each defect type
    how many were caught and the escape rate. Ratios are plain floats, None when undefined (e.g. no
    defective images, nothing failed).
    """
    labels, fails = np.asarray(labels, dtype=bool), np.asarray(fails, dtype=bool)
    defect_types = np.asarray(defect_types)
    if labels.ndim != 1 or not labels.shape == fails.shape == defect_types.shape:
        raise ValueError(f"need one label, verdict and defect type per image; got shapes {labels.shape}, "
                         f"{fails.shape} and {defect_types.shape}")
    counts = {
        "true_pass": int(np.sum(~labels & ~fails)),
        "false_reject": int(np.sum(~labels & fails)),
        "escape": int(np.sum(labels & ~fails)),
        "true_fail": int(np.sum(labels & fails)),
    }
    good, defective = counts["true_pass"] + counts["false_reject"], counts["escape"] + counts["true_fail"]
    per_defect = {}
    for defect in sorted(set(defect_types.tolist())):
        of_type = defect_types == defect
        images, failed = int(of_type.sum()), int(fails[of_type].sum())
        if not labels[of_type].any():
            per_defect[defect] = {"images": images, "rejected": failed, "false_reject_rate": failed / images}
        elif labels[of_type].all():
            per_defect[defect] = {"images": images, "caught": failed, "escape_rate": (images - failed) / images}
        else:
            raise ValueError(f"defect type {defect!r} names both normal and defective images")
    return {
        "counts": counts,
        "accuracy": _ratio(counts["true_pass"] + counts["true_fail"], len(labels)),
        "precision": _ratio(counts["true_fail"], counts["true_fail"] + counts["false_reject"]),
        "recall": _ratio(counts["true_fail"], defective),
        "f1": _ratio(2 * counts["true_fail"], 2 * counts["true_fail"] + counts["false_reject"] + counts["escape"]),
        "false_reject_rate": _ratio(counts["false_reject"], good),
        "escape_rate": _ratio(counts["escape"], defective),
        "per_defect": per_defect,
    }

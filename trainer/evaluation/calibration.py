"""Decision thresholds calibrated on a validation split (never the test set).

Verdict rule everywhere: an image (or pixel) fails iff its score >= the threshold.
"""

from dataclasses import asdict, dataclass
from typing import Literal, get_args

import numpy as np

from trainer.evaluation.metrics import max_f1, subsample_indices

Policy = Literal["false_reject_rate", "max_f1"]
MAX_F1_PIXELS = 2_000_000  # enough for a stable pixel threshold; precision_recall_curve grows with it


def threshold_for_false_reject_rate(normal_scores: np.ndarray, rate: float) -> float:
    """The smallest threshold that fails at most a fraction `rate` of the normal scores."""
    if not 0 <= rate < 1:
        raise ValueError(f"false reject rate must be in [0, 1), got {rate}")
    scores = np.asarray(normal_scores).ravel()
    if scores.size == 0:
        raise ValueError("need at least one normal score to calibrate a threshold")
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    # the tolerance keeps e.g. 0.29 * 100 from flooring to 28
    allowed_fails = int(np.floor(rate * scores.size + 1e-9))
    # everything strictly above the (allowed_fails + 1)-th largest score may fail
    highest_passing = np.partition(scores, scores.size - 1 - allowed_fails)[scores.size - 1 - allowed_fails]
    # step in the scores' own precision, so the threshold still separates them if compared as float32
    return float(np.nextafter(highest_passing, np.inf, dtype=scores.dtype))


def threshold_max_f1(labels: np.ndarray, scores: np.ndarray) -> float:
    """The threshold with the best F1 between normal (False) and defective (True) samples."""
    _, threshold = max_f1(labels, scores)
    if np.isnan(threshold):
        raise ValueError("a max-F1 threshold needs both normal and defective samples")
    return threshold


@dataclass(frozen=True)
class Thresholds:
    image: float
    pixel: float
    policy: Policy
    target_false_reject_rate: float | None  # only for the false_reject_rate policy
    calibration_images: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Thresholds":
        if data["policy"] not in get_args(Policy):
            raise ValueError(f"unknown threshold policy {data['policy']!r}; expected one of {get_args(Policy)}")
        rate = data["target_false_reject_rate"]
        return cls(image=float(data["image"]), pixel=float(data["pixel"]), policy=data["policy"],
                   target_false_reject_rate=None if rate is None else float(rate),
                   calibration_images=int(data["calibration_images"]))


def calibrate(policy: Policy, normal_scores: np.ndarray, normal_maps: np.ndarray,
              anomalous_scores: np.ndarray | None = None, anomalous_maps: np.ndarray | None = None,
              anomalous_masks: np.ndarray | None = None, false_reject_rate: float = 0.01) -> Thresholds:
    """Image and pixel thresholds from validation images: scores [N], maps [N,H,W], masks bool [N,H,W].

    "false_reject_rate" needs only normal images: at most that fraction of normal images fail, and
    at most that fraction of normal pixels are flagged. "max_f1" needs labelled defective images and
    maximises F1 over images and over pixels respectively.
    """
    if policy == "false_reject_rate":
        return Thresholds(image=threshold_for_false_reject_rate(normal_scores, false_reject_rate),
                          pixel=threshold_for_false_reject_rate(normal_maps, false_reject_rate),
                          policy=policy, target_false_reject_rate=false_reject_rate,
                          calibration_images=len(normal_scores))
    if policy == "max_f1":
        given = {"anomalous_scores": anomalous_scores, "anomalous_maps": anomalous_maps,
                 "anomalous_masks": anomalous_masks}
        missing = [name for name, value in given.items() if value is None]
        if missing:
            raise ValueError(f"policy 'max_f1' needs labelled defective samples; missing {', '.join(missing)}")
        image_labels = np.r_[np.zeros(len(normal_scores), bool), np.ones(len(anomalous_scores), bool)]
        pixel_labels = np.r_[np.zeros(np.size(normal_maps), bool), np.asarray(anomalous_masks, bool).ravel()]
        pixel_scores = np.r_[np.ravel(normal_maps), np.ravel(anomalous_maps)]
        if pixel_labels.shape != pixel_scores.shape:
            raise ValueError(f"anomalous masks {np.shape(anomalous_masks)} do not match anomalous maps "
                             f"{np.shape(anomalous_maps)}")
        pixels = subsample_indices(pixel_scores.size, MAX_F1_PIXELS)
        return Thresholds(image=threshold_max_f1(image_labels, np.r_[normal_scores, anomalous_scores]),
                          pixel=threshold_max_f1(pixel_labels[pixels], pixel_scores[pixels]),
                          policy=policy, target_false_reject_rate=None,
                          calibration_images=len(normal_scores) + len(anomalous_scores))
    raise ValueError(f"unknown threshold policy {policy!r}; expected one of {get_args(Policy)}")

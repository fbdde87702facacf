"""Decision thresholds from held-out good images (never the test set, never the images that chose
the model), with the false-reject rate they are expected to give on good parts not yet seen.

Verdict rule everywhere: an image (or pixel) fails iff its score >= the threshold.

Estimators of a threshold failing a fraction `rate` of good parts, from n good scores:
- "conformal": the k-th smallest score, k = ceil((n + 1)(1 - rate)), passes. For exchangeable
  scores a new good part fails with probability (n + 1 - k) / (n + 1) <= rate, whatever their
  distribution; the realised rate of a given threshold is Beta(n + 1 - k, k). It needs
  n >= 1/rate - 1 (99 images for 1 %).
- "logit-normal": below that, the scores' logits (scores lie in [0, 1]) are taken as normal and
  the threshold is the (1 - rate) quantile of the predictive Student-t for a new score, which
  fails a new good part with probability `rate` if the model holds. Its uncertainty comes from
  the posterior of the normal's mean and spread (Jeffreys prior).
The pixel threshold applies the same estimator to each good image's highest map value: a good
part shows no defect pixel at all, except at the target rate.

A threshold extrapolated from few good images (logit-normal) can land above every defect: 6 good
images put a 1 % threshold where a t-distribution with 5 degrees of freedom puts its tail. So it is
capped by the detection ceiling, the highest threshold that still fails MIN_SYNTHETIC_CATCH of the
synthetic defects made on the calibration images, and the rate stated is the fit's rate at the cap.
A conformal threshold is never capped: its rate is observed, and the target is the engineer's.
"""

import math
from dataclasses import asdict, dataclass
from typing import Literal, get_args

import numpy as np
from scipy import stats

from trainer.evaluation.metrics import max_f1, subsample_indices

Policy = Literal["false_reject_rate", "max_f1"]
Estimator = Literal["conformal", "logit-normal"]
Limit = Literal["false_reject_rate", "synthetic_defects"]
# An extrapolated threshold may pass at most 1 - this share of synthetic defects. A threshold that
# passes most of the defects the model was trained to find serves no line, whatever rate it states.
MIN_SYNTHETIC_CATCH = 0.9
MAX_F1_PIXELS = 2_000_000  # enough for a stable pixel threshold; precision_recall_curve grows with it
UPPER_QUANTILE = 0.9  # the "at most" rate reported beside the expected one
_POSTERIOR_DRAWS = 20_000
_LOGIT_CLIP = 1e-6  # scores of exactly 0 or 1 have no logit


@dataclass(frozen=True)
class RateEstimate:
    """A threshold and the false-reject rate it should give on new good parts."""
    threshold: float
    estimator: Estimator
    expected_rate: float  # mean false-reject rate on new good parts
    upper_rate: float  # the realised rate is below this with probability UPPER_QUANTILE
    images: int


def _check(scores: np.ndarray, rate: float) -> np.ndarray:
    if not 0 < rate < 1:
        raise ValueError(f"false reject rate must be in (0, 1), got {rate}")
    return _good_scores(scores)


def _good_scores(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if scores.size < 2:
        raise ValueError(f"need at least 2 good images to calibrate a threshold, got {scores.size}")
    return scores


def _just_above(value: float) -> float:
    """The next float32 above `value`: a station comparing float32 scores sees the same verdicts."""
    return float(np.nextafter(np.float32(value), np.float32(np.inf)))


def _at_or_below(value: float) -> float:
    """The highest float32 not above `value`: the score it came from fails, in float32 or float64."""
    rounded = np.float32(value)
    return float(rounded if rounded <= value else np.nextafter(rounded, np.float32(-np.inf)))


def conformal_rank(n: int, rate: float) -> int | None:
    """The rank (1-based, ascending) of the highest passing score, or None if n is too small."""
    k = math.ceil((n + 1) * (1 - rate) - 1e-9)  # the tolerance keeps e.g. 0.99 * 100 from rounding up
    return k if k <= n else None


def conformal_threshold(scores: np.ndarray, rate: float) -> RateEstimate | None:
    """Split-conformal threshold; None when the scores are too few for `rate`."""
    scores = _check(scores, rate)
    n = scores.size
    k = conformal_rank(n, rate)
    if k is None:
        return None
    threshold = _just_above(np.sort(scores)[k - 1])
    a, b = n + 1 - k, k
    return RateEstimate(threshold, "conformal", a / (a + b), float(stats.beta.ppf(UPPER_QUANTILE, a, b)), n)


def _logits(scores: np.ndarray) -> np.ndarray:
    return stats.logistic.ppf(np.clip(scores, _LOGIT_CLIP, 1 - _LOGIT_CLIP))


def _logit_normal_rates(z: np.ndarray, z_threshold: float, seed: int) -> tuple[float, float]:
    """(expected, UPPER_QUANTILE) false-reject rate at a logit threshold, over the posterior of the
    normal given the logits z: sigma² ~ (n-1)s²/χ²(n-1), mu ~ N(mean, sigma²/n) (Jeffreys prior)."""
    n, mean, spread = z.size, z.mean(), max(z.std(ddof=1), 1e-6)
    rng = np.random.default_rng(seed)
    sigma = spread * np.sqrt((n - 1) / rng.chisquare(n - 1, _POSTERIOR_DRAWS))
    mu = rng.normal(mean, sigma / math.sqrt(n))
    rates = stats.norm.sf((z_threshold - mu) / sigma)
    return float(rates.mean()), float(np.quantile(rates, UPPER_QUANTILE))


def logit_normal_threshold(scores: np.ndarray, rate: float, seed: int = 0) -> RateEstimate:
    scores = _check(scores, rate)
    n, z = scores.size, _logits(scores)
    spread = max(z.std(ddof=1), 1e-6)
    z_threshold = z.mean() + spread * math.sqrt(1 + 1 / n) * stats.t.ppf(1 - rate, n - 1)
    threshold = _just_above(stats.logistic.cdf(z_threshold))
    return RateEstimate(threshold, "logit-normal", *_logit_normal_rates(z, z_threshold, seed), n)


def logit_normal_rate_at(scores: np.ndarray, threshold: float, seed: int = 0) -> RateEstimate:
    """The false-reject rate the logit-normal fit of these good scores expects at a given threshold."""
    scores = _good_scores(scores)
    z_threshold = float(_logits(np.float64(threshold)))
    return RateEstimate(threshold, "logit-normal", *_logit_normal_rates(_logits(scores), z_threshold, seed),
                        scores.size)


def estimate_threshold(scores: np.ndarray, rate: float) -> RateEstimate:
    """Conformal when there are enough scores for `rate`, else the logit-normal fit."""
    return conformal_threshold(scores, rate) or logit_normal_threshold(scores, rate)


def threshold_max_f1(labels: np.ndarray, scores: np.ndarray) -> float:
    """The threshold with the best F1 between normal (False) and defective (True) samples."""
    _, threshold = max_f1(labels, scores)
    if np.isnan(threshold):
        raise ValueError("a max-F1 threshold needs both normal and defective samples")
    return threshold


def catching_threshold(scores: np.ndarray, share: float = MIN_SYNTHETIC_CATCH) -> float:
    """The highest threshold that fails at least `share` of these (defective) scores."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if ordered.size == 0:
        raise ValueError("need at least one defective score")
    return _at_or_below(ordered[ordered.size - math.ceil(share * ordered.size - 1e-9)])


@dataclass(frozen=True)
class DetectionCeiling:
    """The highest image and pixel thresholds that still fail MIN_SYNTHETIC_CATCH of the synthetic
    defects made on the calibration images (pixel: the highest map value inside each defect)."""
    image: float
    pixel: float

    @classmethod
    def from_synthetic(cls, scores: np.ndarray, maps: np.ndarray, masks: np.ndarray) -> "DetectionCeiling":
        """scores [M], maps [M,H,W], masks bool [M,H,W] of synthetic defects."""
        masks = np.asarray(masks, bool)
        if masks.shape != np.shape(maps) or len(scores) != len(masks):
            raise ValueError(f"synthetic defects: {len(scores)} scores, maps {np.shape(maps)}, masks {masks.shape}")
        shown = masks.reshape(len(masks), -1).any(axis=1)
        peaks = np.where(masks, maps, -np.inf).reshape(len(masks), -1).max(axis=1)[shown]
        return cls(image=catching_threshold(scores), pixel=catching_threshold(peaks))


@dataclass(frozen=True)
class Thresholds:
    image: float
    pixel: float
    policy: Policy
    target_false_reject_rate: float | None  # only for the false_reject_rate policy
    calibration_images: int
    # The false_reject_rate policy's promise for new good parts, and how it was reached.
    estimator: Estimator | None = None
    expected_false_reject_rate: float | None = None
    false_reject_rate_upper: float | None = None
    # What set the thresholds: the target rate, or (few images) the synthetic defects they must catch.
    limited_by: Limit | None = None
    detection_ceiling_image: float | None = None
    detection_ceiling_pixel: float | None = None

    def ceiling(self) -> DetectionCeiling | None:
        if self.detection_ceiling_image is None or self.detection_ceiling_pixel is None:
            return None
        return DetectionCeiling(self.detection_ceiling_image, self.detection_ceiling_pixel)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Thresholds":
        if data["policy"] not in get_args(Policy):
            raise ValueError(f"unknown threshold policy {data['policy']!r}; expected one of {get_args(Policy)}")
        return cls(**{**data, "image": float(data["image"]), "pixel": float(data["pixel"])})

    def too_few_images(self) -> str | None:
        """A warning when the rate rests on a fit rather than on enough observed good parts."""
        if self.estimator != "logit-normal":
            return None
        target = self.target_false_reject_rate
        needed = math.ceil(1 / target) - 1
        warning = (f"{self.calibration_images} calibration images are too few to observe a {target:.1%} "
                   f"false-reject rate (that takes {needed}): ")
        if self.limited_by == "synthetic_defects":
            warning += (f"a {target:.1%} threshold extrapolated from them would pass more than "
                        f"{1 - MIN_SYNTHETIC_CATCH:.0%} of synthetic defects, so the thresholds were lowered to "
                        f"catch {MIN_SYNTHETIC_CATCH:.0%} of them; a logit-normal fit of the good scores expects "
                        f"{self.expected_false_reject_rate:.1%} false rejects there")
        else:
            warning += "the expected rate rests on a logit-normal fit of the good scores"
        return warning + "; recalibrate with more good images (trainer calibrate)"


def calibrate(policy: Policy, normal_scores: np.ndarray, normal_maps: np.ndarray,
              anomalous_scores: np.ndarray | None = None, anomalous_maps: np.ndarray | None = None,
              anomalous_masks: np.ndarray | None = None, false_reject_rate: float = 0.01,
              ceiling: DetectionCeiling | None = None) -> Thresholds:
    """Image and pixel thresholds: scores [N], maps [N,H,W], masks bool [N,H,W].

    "false_reject_rate" needs only good images (see the module docstring); `ceiling` caps the
    thresholds it extrapolates. "max_f1" needs labelled defective images and maximises F1 over
    images and over pixels respectively.
    """
    if policy == "false_reject_rate":
        image = estimate_threshold(normal_scores, false_reject_rate)
        highest_pixels = np.asarray(normal_maps).reshape(len(normal_scores), -1).max(axis=1)
        pixel = estimate_threshold(highest_pixels, false_reject_rate)
        limited_by = "false_reject_rate"
        if ceiling is not None and image.estimator == "logit-normal":
            if image.threshold > ceiling.image:
                image, limited_by = logit_normal_rate_at(normal_scores, ceiling.image), "synthetic_defects"
            if pixel.threshold > ceiling.pixel:
                pixel, limited_by = logit_normal_rate_at(highest_pixels, ceiling.pixel), "synthetic_defects"
        return Thresholds(image=image.threshold, pixel=pixel.threshold, policy=policy,
                          target_false_reject_rate=false_reject_rate, calibration_images=image.images,
                          estimator=image.estimator, expected_false_reject_rate=image.expected_rate,
                          false_reject_rate_upper=image.upper_rate, limited_by=limited_by,
                          detection_ceiling_image=None if ceiling is None else ceiling.image,
                          detection_ceiling_pixel=None if ceiling is None else ceiling.pixel)
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

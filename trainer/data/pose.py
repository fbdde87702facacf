"""Pose augmentation: training images turned and shifted the way the part varies on the line, so a
good part in a pose the training images happened not to show is not a defect.

`auto` measures the training images' own variation. Rotation: each image's in-plane angle against
the first one, the turn that matches them best (objects centred on their foreground; textures by
their power spectra, which do not depend on where a crop lies). Shift: where the object's
foreground centre lies (objects only: a texture has no position). Mirror images of the part are
never made: a mirrored part is another part (a left-hand bracket on a right-hand line must fail).
"""

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

Augment = Literal["auto", "none", "shift", "rotate"]

ANALYSIS_SIZE = 64  # px a side the angles are measured at
STEP_DEGREES = 5
# `auto` augments when 90 % of the images lie within these of the set's typical pose: below them the
# parts are placed alike, and turning or moving them would teach the model poses it never meets.
MIN_ROTATION_DEGREES = 15.0
MIN_SHIFT = 0.03  # of the image side
# What `rotate` and `shift` set by hand mean: any orientation; a shift of a sixteenth of the side.
ANY_ROTATION_DEGREES, HAND_SHIFT = 180.0, 1 / 16


@dataclass(frozen=True)
class PoseAugmentation:
    """A random rotation within ±degrees about the image centre and a shift within ±shift of the
    side on each axis; borders are reflected. Zero ranges change nothing and draw nothing."""

    degrees: float = 0.0
    shift: float = 0.0

    def __call__(self, image: np.ndarray, foreground: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if not (self.degrees or self.shift):
            return image, foreground
        height, width = image.shape[:2]
        angle = rng.uniform(-self.degrees, self.degrees)
        dx, dy = rng.uniform(-self.shift, self.shift, size=2) * (width, height)
        matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), angle, 1.0)
        matrix[:, 2] += (dx, dy)
        posed = cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REFLECT_101)
        region = cv2.warpAffine(foreground.astype(np.uint8), matrix, (width, height), flags=cv2.INTER_NEAREST,
                                borderMode=cv2.BORDER_REFLECT_101)
        return posed, region.astype(bool)


def _gray(image: np.ndarray) -> np.ndarray:
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return cv2.resize(gray, (ANALYSIS_SIZE, ANALYSIS_SIZE), interpolation=cv2.INTER_AREA).astype(np.float32)


def turned(image: np.ndarray, degrees: float, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """The image turned about its centre (counter-clockwise), borders reflected as in training."""
    centre = ((image.shape[1] - 1) / 2, (image.shape[0] - 1) / 2)
    return cv2.warpAffine(image, cv2.getRotationMatrix2D(centre, degrees, 1.0), image.shape[1::-1],
                          flags=interpolation, borderMode=cv2.BORDER_REFLECT_101)


def _centred(gray: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """The image moved so that its foreground's centre is the image centre."""
    mask = cv2.resize(foreground.astype(np.uint8), gray.shape[::-1], interpolation=cv2.INTER_NEAREST)
    if not mask.any():
        return gray
    y, x = np.argwhere(mask).mean(axis=0)
    move = np.float32([[1, 0, (gray.shape[1] - 1) / 2 - x], [0, 1, (gray.shape[0] - 1) / 2 - y]])
    return cv2.warpAffine(gray, move, gray.shape[::-1], flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def _log_spectrum(gray: np.ndarray) -> np.ndarray:
    """Log power spectrum, zero frequency at the centre: where a texture repeats, not where it lies."""
    window = np.outer(np.hanning(gray.shape[0]), np.hanning(gray.shape[1])).astype(np.float32)
    spectrum = np.fft.fftshift(np.abs(np.fft.fft2((gray - gray.mean()) * window)) ** 2)
    return np.log1p(spectrum).astype(np.float32)


def _disc(size: int) -> np.ndarray:
    """The inscribed disc, without the centre pixel: what any rotation keeps inside the image."""
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    radius = np.hypot(y, x)
    return (radius <= size / 2 - 1) & (radius >= 1)


def _standardised(pixels: np.ndarray) -> np.ndarray:
    """Rows of [..., P] with zero mean and unit norm: their dot products are correlations."""
    centred = pixels - pixels.mean(axis=-1, keepdims=True)
    return centred / np.maximum(np.linalg.norm(centred, axis=-1, keepdims=True), 1e-12)


def rotations_to(reference: np.ndarray, pictures: list[np.ndarray], period: int) -> np.ndarray:
    """For each picture, the degrees (counter-clockwise, as cv2.getRotationMatrix2D turns) that turn
    `reference` into it best, in steps of STEP_DEGREES over one `period` (360, or 180 for spectra,
    which cannot tell a half turn), wrapped to (-period/2, period/2]."""
    inside = _disc(reference.shape[0])
    angles = np.arange(0, period, STEP_DEGREES, dtype=float)
    references = _standardised(np.stack([turned(reference, a)[inside] for a in angles]))
    scores = _standardised(np.stack([picture[inside] for picture in pictures])) @ references.T
    return wrap_degrees(angles[np.argmax(scores, axis=1)], period)


def wrap_degrees(angle: np.ndarray | float, period: float = 360.0) -> np.ndarray | float:
    half = period / 2
    return half - np.mod(half - np.asarray(angle), period)


def rotation_spread(images: np.ndarray, foregrounds: np.ndarray, is_object: bool) -> tuple[float, float]:
    """(90th percentile, largest) angle of the images from their mean orientation, degrees. An
    object is compared pixel by pixel, centred on its foreground; a texture by its power spectrum,
    which does not depend on where the crop lies (and cannot tell a half turn)."""
    if is_object:
        pictures, period = [_centred(_gray(im), fg) for im, fg in zip(images, foregrounds)], 360
    else:
        pictures, period = [_log_spectrum(_gray(im)) for im in images], 180
    angles = rotations_to(pictures[0], pictures, period)
    # Circular statistics over the period: a half turn is no turn for a spectrum.
    turns = 2 * np.pi * angles / period
    mean = np.angle(np.exp(1j * turns).mean()) * period / (2 * np.pi)
    deviations = np.abs(wrap_degrees(angles - mean, period))
    return float(np.percentile(deviations, 90)), float(deviations.max())


def shift_spread(foregrounds: np.ndarray) -> tuple[float, float]:
    """(90th percentile, largest) offset of the foregrounds' centres from their mean centre, the
    larger of the two axes, as a fraction of the side."""
    found = [mask for mask in foregrounds if mask.any()]
    if len(found) < 2:
        return 0.0, 0.0
    centres = np.array([np.argwhere(mask).mean(axis=0) / mask.shape for mask in found])
    offsets = np.abs(centres - centres.mean(axis=0)).max(axis=1)
    return float(np.percentile(offsets, 90)), float(offsets.max())


# What the settings other than `auto` mean.
HAND_SET = {"none": PoseAugmentation(), "rotate": PoseAugmentation(ANY_ROTATION_DEGREES, HAND_SHIFT),
            "shift": PoseAugmentation(0.0, HAND_SHIFT)}


def choose_pose(setting: Augment, images: np.ndarray, foregrounds: np.ndarray,
                is_object: bool) -> tuple[PoseAugmentation, dict]:
    """The training images' augmentation and the record of the decision (config.json): set by hand,
    or for `auto` from the images' variation (rotation, or else shift, each over the range seen)."""
    if setting != "auto":
        return _recorded(setting, HAND_SET[setting], chosen_by="config")
    typical_turn, largest_turn = rotation_spread(images, foregrounds, is_object)
    typical_shift, largest_shift = shift_spread(foregrounds) if is_object else (0.0, 0.0)
    shift = largest_shift if typical_shift >= MIN_SHIFT else 0.0
    if typical_turn >= MIN_ROTATION_DEGREES:
        mode, augmentation = "rotate", PoseAugmentation(largest_turn, shift)
    else:
        mode, augmentation = ("shift", PoseAugmentation(0.0, shift)) if shift else ("none", PoseAugmentation())
    return _recorded(mode, augmentation, chosen_by="auto", rotation_90th_degrees=round(typical_turn, 1),
                     shift_90th=round(typical_shift, 3))


def _recorded(mode: str, augmentation: PoseAugmentation, **decision) -> tuple[PoseAugmentation, dict]:
    return augmentation, {"mode": mode, "degrees": round(augmentation.degrees, 1),
                          "shift": round(augmentation.shift, 3), **decision}


def pose_summary(record: dict) -> str:
    """A config.json pose record in a few words; runs from before pose augmentation have none."""
    if record is None or record["mode"] == "none":
        return "none"
    ranges = ([f"±{record['degrees']:g}°"] if record["degrees"] else []) + (
        [f"±{record['shift']:.1%} of the side"] if record["shift"] else [])
    return f"{record['mode']} {', '.join(ranges)}"

"""Object foregrounds, where synthetic anomalies may be drawn: computed classically or given by the user."""

from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from scipy import ndimage

from trainer.data.mvtec import DataError, list_images, mask_key, read_mask

ForegroundMode = Literal["object", "texture"]

BORDER_FRACTION = 1 / 32  # width of the image border taken as background sample
# Lightness counts a quarter of colour: shadows cast on the background change lightness, objects colour too.
LAB_WEIGHTS = np.array([0.25, 1.0, 1.0], dtype=np.float32)
MIN_COMPONENT_FRACTION = 0.01  # smaller blobs are noise or dirt, not the object
# Beyond these the segmentation failed (or the image is a texture): anomalies may go anywhere.
MIN_COVERAGE, MAX_COVERAGE = 0.05, 0.98
MAX_BORDER_COVERAGE = 0.25
# `auto` trains an object class when the object segmentation holds on at least this share of the
# training images: a part on a background holds on nearly all, a texture on few.
AUTO_OBJECT_SHARE = 0.8


def foreground_mask(image: np.ndarray, mode: ForegroundMode) -> np.ndarray:
    """bool [H, W] of the pixels an anomaly may cover: all of a texture; the object otherwise."""
    mask = _object_mask(image) if mode == "object" else None
    return mask if mask is not None and _is_object(mask) else np.ones(image.shape[:2], dtype=bool)


def choose_foreground(images: np.ndarray) -> tuple[ForegroundMode, float]:
    """`object` or `texture` for `foreground = "auto"`, and the share of images showing an object."""
    share = float(np.mean([_is_object(_object_mask(image)) for image in images]))
    return ("object" if share >= AUTO_OBJECT_SHARE else "texture"), share


def _is_object(mask: np.ndarray) -> bool:
    """Whether a segmentation found an object; beyond these bounds it failed, or the image is a texture."""
    coverage, border_coverage = mask.mean(), _border_pixels(mask).mean()
    return MIN_COVERAGE <= coverage <= MAX_COVERAGE and border_coverage <= MAX_BORDER_COVERAGE


def _object_mask(image: np.ndarray) -> np.ndarray:
    """Pixels whose colour differs from the background's, the background colour being the border's median."""
    smooth = cv2.GaussianBlur(image, (5, 5), 0)
    lab = cv2.cvtColor(smooth, cv2.COLOR_RGB2LAB).astype(np.float32)
    background = np.median(_border_pixels(lab), axis=0)
    distance = np.linalg.norm((lab - background) * LAB_WEIGHTS, axis=-1)
    scaled = cv2.normalize(distance, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    _, mask = cv2.threshold(scaled, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (_kernel_size(image),) * 2)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
    return _drop_small_components(ndimage.binary_fill_holes(mask))


def _border_pixels(image: np.ndarray) -> np.ndarray:
    width = max(1, round(min(image.shape[:2]) * BORDER_FRACTION))
    border = np.ones(image.shape[:2], dtype=bool)
    border[width:-width, width:-width] = False
    return image[border]


def _kernel_size(image: np.ndarray) -> int:
    return max(3, min(image.shape[:2]) // 50) | 1  # odd, about 2% of the image


def _drop_small_components(mask: np.ndarray) -> np.ndarray:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    large = stats[:, cv2.CC_STAT_AREA] >= MIN_COMPONENT_FRACTION * mask.size
    large[0] = False  # label 0 is the background
    return large[labels]


def load_user_masks(folder: Path, size: int) -> dict[str, np.ndarray]:
    """User foreground masks, bool [size, size], keyed by image stem (files <stem>.png or <stem>_mask.png)."""
    if not folder.is_dir():
        raise DataError(f"{folder}: foreground mask folder not found")
    paths = list_images(folder)
    if not paths:
        raise DataError(f"no mask images in {folder}")
    masks: dict[str, np.ndarray] = {}
    for path in paths:
        key = mask_key(path)
        if key in masks:
            raise DataError(f"{path}: a second foreground mask for image stem {key!r}")
        masks[key] = read_mask(path, size)
    return masks

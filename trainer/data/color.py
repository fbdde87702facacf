"""Whether a part's pictures carry colour: a gray part gets a one-channel model, so the denoiser
spends nothing on learning that three equal channels stay equal (and never paints colour noise)."""

import numpy as np

# A pixel has colour when its channels are further apart than this (of 255): above JPEG chroma
# rounding and sensor noise on a gray part, below any tint a person would call a colour.
COLOR_SPREAD_LEVELS = 8
# Gray when fewer than this share of all training pixels has colour (a label or a reflection may).
GRAY_MAX_COLORED_SHARE = 0.01
CHANNELS = {"rgb": 3, "gray": 1}


def colored_share(images: np.ndarray) -> float:
    """Share of the pixels of uint8 RGB [N, H, W, 3] images whose channels differ by more than
    COLOR_SPREAD_LEVELS."""
    spread = images.max(axis=-1).astype(np.int16) - images.min(axis=-1)
    return float((spread > COLOR_SPREAD_LEVELS).mean())


def choose_color(images: np.ndarray) -> tuple[str, float]:
    """("gray" | "rgb", share of coloured pixels) for a part's training images."""
    share = colored_share(images)
    return ("gray" if share < GRAY_MAX_COLORED_SHARE else "rgb"), share

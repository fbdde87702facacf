"""Gradient (Perlin) noise and the thresholded, rotated Perlin regions where anomalies are drawn."""

import cv2
import numpy as np

MAX_SCALE_EXPONENT = 5  # lattice cells per axis are 2**U{0..5}
THRESHOLD = 0.5


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """float64 [H, W] classic 2-D Perlin noise in [-1, 1], res lattice cells per axis, zero on lattice points.

    Cells are whole pixels: the noise is made on the smallest grid that res divides, then cropped.
    """
    cell = (-(-shape[0] // res[0]), -(-shape[1] // res[1]))  # ceiling division
    angles = rng.uniform(0, 2 * np.pi, (res[0] + 1, res[1] + 1))
    gradients = np.stack([np.cos(angles), np.sin(angles)], axis=-1)

    # Lattice cell index and position inside the cell of every pixel row (y) and column (x).
    y_cell, y = np.divmod(np.arange(shape[0]), cell[0])
    x_cell, x = np.divmod(np.arange(shape[1]), cell[1])
    y = (y / cell[0])[:, None]
    x = (x / cell[1])[None, :]
    y_cell, x_cell = y_cell[:, None], x_cell[None, :]

    def corner_dot(dy: int, dx: int) -> np.ndarray:
        gradient = gradients[y_cell + dy, x_cell + dx]
        return gradient[..., 0] * (y - dy) + gradient[..., 1] * (x - dx)

    fade_y, fade_x = _fade(y), _fade(x)
    top = corner_dot(0, 0) * (1 - fade_x) + corner_dot(0, 1) * fade_x
    bottom = corner_dot(1, 0) * (1 - fade_x) + corner_dot(1, 1) * fade_x
    # Unit gradients give at most sqrt(1/2) in 2-D; scaling to [-1, 1] makes the 0.5 threshold meaningful.
    return np.sqrt(2) * (top * (1 - fade_y) + bottom * fade_y)


def _fade(t: np.ndarray) -> np.ndarray:
    # Perlin's quintic: zero first and second derivatives at the cell edges, so no creases.
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    """bool [size, size]: Perlin noise at a random scale per axis, rotated by U(-90, 90) degrees, > 0.5."""
    res = tuple(int(2 ** rng.integers(0, MAX_SCALE_EXPONENT + 1)) for _ in range(2))
    noise = perlin_noise((size, size), res, rng).astype(np.float32)
    rotation = cv2.getRotationMatrix2D((size / 2, size / 2), rng.uniform(-90, 90), 1.0)
    noise = cv2.warpAffine(noise, rotation, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return noise > THRESHOLD

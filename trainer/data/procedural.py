"""Licence-clean pictures made from nothing: what the shipped denoiser weights learned to denoise
before they meet a part (`trainer pretrain`). Surfaces (fractal Perlin textures, gradients) with
objects drawn on them (discs, boxes, polygons, strokes; flat, shaded or textured; sharp or soft
edges), so the denoiser has seen edges, flat regions and fine texture at every scale."""

import cv2
import numpy as np

from trainer.data.perlin import perlin_noise

SHAPES_PER_IMAGE = (2, 12)
# Real parts are mostly muted: saturation is drawn low more often than high.
SATURATION_POWER = 2.0


def random_color(rng: np.random.Generator) -> np.ndarray:
    """float32 RGB in [0, 1]: a random hue, mostly low saturation, any value."""
    hsv = np.array([[[rng.uniform(0, 180), 255 * rng.uniform(0, 1) ** SATURATION_POWER, 255 * rng.uniform(0.05, 1)]]],
                   dtype=np.float32)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32) / 255


def fractal_noise(size: int, rng: np.random.Generator) -> np.ndarray:
    """float32 [size, size] in [0, 1]: Perlin octaves from a random coarsest scale, each finer octave
    weaker by a random persistence (high persistence: grainy surfaces like cast or sintered parts)."""
    coarsest = int(rng.integers(0, 5))
    octaves = int(rng.integers(1, 5))
    persistence = rng.uniform(0.4, 0.9)
    total, weight = np.zeros((size, size)), 0.0
    for octave in range(octaves):
        cells = min(2 ** (coarsest + octave), size // 2)
        amplitude = persistence**octave
        total += amplitude * perlin_noise((size, size), (cells, cells), rng)
        weight += amplitude
    return (0.5 + 0.5 * total / weight).clip(0, 1).astype(np.float32)


def surface(size: int, rng: np.random.Generator) -> np.ndarray:
    """float32 RGB [size, size, 3]: a flat colour, a linear gradient or a two-colour fractal texture."""
    first, second = random_color(rng), random_color(rng)
    kind = rng.integers(3)
    if kind == 0:
        return np.broadcast_to(first, (size, size, 3)).copy()
    if kind == 1:
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.cos(angle) * np.arange(size)[None, :] + np.sin(angle) * np.arange(size)[:, None]
        blend = ((ramp - ramp.min()) / max(np.ptp(ramp), 1e-6)).astype(np.float32)
    else:
        blend = fractal_noise(size, rng)
    return first + (second - first) * blend[..., None]


def shape_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    """float32 [size, size] coverage in [0, 1] of one random shape, anti-aliased."""
    canvas = np.zeros((size, size), np.uint8)
    centre = rng.integers(0, size, 2)
    extent = int(rng.uniform(0.03, 0.4) * size) + 1
    kind = rng.integers(4)
    if kind == 0:
        axes = (extent, int(extent * rng.uniform(0.3, 1)) + 1)
        cv2.ellipse(canvas, tuple(int(c) for c in centre), axes, rng.uniform(0, 180), 0, 360, 255, -1, cv2.LINE_AA)
    elif kind == 1:
        box = ((float(centre[0]), float(centre[1])), (float(extent * 2), float(extent * rng.uniform(0.2, 2))),
               rng.uniform(0, 180))
        cv2.fillPoly(canvas, [np.intp(cv2.boxPoints(box))], 255, cv2.LINE_AA)
    elif kind == 2:
        angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 9))))
        radii = extent * rng.uniform(0.4, 1, len(angles))
        points = centre + np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
        cv2.fillPoly(canvas, [points.astype(np.int32)], 255, cv2.LINE_AA)
    else:
        end = centre + rng.integers(-extent, extent + 1, 2)
        thickness = int(rng.integers(1, max(2, extent // 4)))
        cv2.line(canvas, tuple(int(c) for c in centre), tuple(int(c) for c in end), 255, thickness, cv2.LINE_AA)
    mask = canvas.astype(np.float32) / 255
    if rng.uniform() < 0.3:  # a soft edge: out of focus, or a shadow
        mask = cv2.GaussianBlur(mask, (0, 0), rng.uniform(0.5, 3))
    return mask


def procedural_image(size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 RGB [size, size, 3]: a surface with random shapes on it, each filled with a surface of its
    own; then, sometimes, a slight blur of the whole picture."""
    image = surface(size, rng)
    for _ in range(int(rng.integers(*SHAPES_PER_IMAGE))):
        coverage = shape_mask(size, rng)[..., None]
        image = image * (1 - coverage) + surface(size, rng) * coverage
    if rng.uniform() < 0.3:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.3, 1.2))
    return np.rint(image * 255).clip(0, 255).astype(np.uint8)

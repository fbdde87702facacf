"""Synthetic anomalies (METHOD.md "Anomaly synthesis"): a Perlin region of the object blended with a
texture or a shuffled copy of the image, both put through three random augmenters."""

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from trainer.data.mvtec import DataError, is_image_file, read_rgb
from trainer.data.perlin import perlin_mask
from trainer.data.procedural import procedural_image

Augmenter = Callable[[np.ndarray, np.random.Generator], np.ndarray]  # uint8 RGB in, uint8 RGB out
TextureSource = Callable[[np.random.Generator], np.ndarray]  # a uint8 RGB texture at the synthesizer's size
TextureSetting = Literal["auto", "procedural", "none"] | Path
TEXTURE_WORDS = ("auto", "procedural", "none")  # the settings that name no folder

AUGMENTERS_PER_SOURCE = 3
GRID_SIZES = (2, 4, 8)
BETA_RANGE = (0.2, 0.8)  # opacity of the normal image inside the anomaly
MIN_ANOMALY_FRACTION = 0.005  # of the image; smaller Perlin-foreground overlaps are redrawn
MAX_REGION_TRIES = 10
OBJECT_TEXTURE_PROBABILITY = 0.5  # texture classes always use a texture source


def gamma_contrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    levels = np.linspace(0, 1, 256) ** rng.uniform(0.5, 2.0)
    return cv2.LUT(image, np.rint(levels * 255).astype(np.uint8))


def brightness(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    scaled = image.astype(np.float32) * rng.uniform(0.8, 1.2) + rng.uniform(-30, 30)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def sharpen(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    strength, lightness = rng.uniform(0.2, 1.0), rng.uniform(0.75, 1.5)
    edges = -np.ones((3, 3), dtype=np.float32)
    edges[1, 1] = 8 + lightness
    identity = np.zeros((3, 3), dtype=np.float32)
    identity[1, 1] = 1
    return cv2.filter2D(image, -1, strength * edges + (1 - strength) * identity)


def hue_shift(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    shift = rng.integers(-25, 26)  # OpenCV hue unit is 2 degrees: up to +-50 degrees
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + shift) % 180
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def solarize(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    threshold = rng.integers(32, 129)
    return np.where(image >= threshold, 255 - image, image)


def posterize(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    kept_bits = int(rng.integers(2, 6))
    return image & np.uint8((0xFF << (8 - kept_bits)) & 0xFF)


def invert(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 255 - image


def autocontrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    low = image.min(axis=(0, 1), keepdims=True).astype(np.float32)
    high = image.max(axis=(0, 1), keepdims=True).astype(np.float32)
    stretched = (image - low) * 255 / np.maximum(high - low, 1)
    return np.rint(stretched).astype(np.uint8)


def equalize(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # On luminance only, so the colours keep their hue.
    ycrcb = cv2.cvtColor(image, cv2.COLOR_RGB2YCrCb)
    ycrcb[..., 0] = cv2.equalizeHist(ycrcb[..., 0])
    return cv2.cvtColor(ycrcb, cv2.COLOR_YCrCb2RGB)


def rotate(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    height, width = image.shape[:2]
    rotation = cv2.getRotationMatrix2D((width / 2, height / 2), rng.uniform(-45, 45), 1.0)
    # Reflected borders: black corners would be an easy giveaway for the segmenter.
    return cv2.warpAffine(image, rotation, (width, height), borderMode=cv2.BORDER_REFLECT_101)


AUGMENTERS: tuple[Augmenter, ...] = (
    gamma_contrast, brightness, sharpen, hue_shift, solarize, posterize, invert, autocontrast, equalize, rotate,
)


def augment_source(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image through three distinct augmenters drawn at random, in random order."""
    for index in rng.choice(len(AUGMENTERS), AUGMENTERS_PER_SOURCE, replace=False):
        image = AUGMENTERS[index](image, rng)
    return image


def self_augmented(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image cut into a k x k grid (k in 2, 4, 8) with the tiles permuted.

    Rows and columns beyond a multiple of k stay in place.
    """
    k = int(rng.choice(GRID_SIZES))
    tile_h, tile_w = image.shape[0] // k, image.shape[1] // k
    region = image[: k * tile_h, : k * tile_w]
    tiles = region.reshape(k, tile_h, k, tile_w, -1).swapaxes(1, 2).reshape(k * k, tile_h, tile_w, -1)
    shuffled = tiles[rng.permutation(k * k)].reshape(k, k, tile_h, tile_w, -1).swapaxes(1, 2)
    result = image.copy()
    result[: k * tile_h, : k * tile_w] = shuffled.reshape(region.shape)
    return result


class TextureFolder:
    """Texture images from a folder (e.g. DTD), each decoded once: decoding dominates a draw's cost."""

    def __init__(self, paths: Sequence[Path], size: int):
        self.paths = tuple(paths)
        self.size = size
        self._decoded: dict[Path, np.ndarray] = {}

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        path = self.paths[rng.integers(len(self.paths))]
        if path not in self._decoded:
            self._decoded[path] = read_rgb(path, self.size)
        return self._decoded[path]


class ProceduralTextures:
    """A new procedural picture each draw (surfaces and shapes, trainer/data/procedural.py): foreign
    material unlike the part, with no image set to download or licence to check."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        return procedural_image(self.size, rng)


def resolve_textures(setting: TextureSetting, foreground_mode: str) -> TextureSetting:
    """auto: procedural pictures on objects, where foreign material is the typical defect; none on textures,
    whose every defect takes the texture source: there, a surface's own shuffled tiles (measured: README)."""
    if setting != "auto":
        return setting
    return "procedural" if foreground_mode == "object" else "none"


def texture_source(setting: TextureSetting | str, size: int) -> TextureSource | None:
    """The `textures` setting (resolved) as a source of size x size textures; none: the image's own tiles only."""
    if setting == "auto":
        raise ValueError("textures = auto is resolved by the foreground mode first (resolve_textures)")
    if setting == "none":
        return None
    if setting == "procedural":
        return ProceduralTextures(size)
    return TextureFolder(list_textures(Path(setting)), size)


class AnomalySynthesizer:
    """Turns a normal image into (synthetic anomaly, mask); picklable, so data-loader workers can use it."""

    def __init__(
        self, size: int, textures: TextureSource | None = None,
        texture_probability: float = OBJECT_TEXTURE_PROBABILITY,
    ):
        if not 0 <= texture_probability <= 1:
            raise ValueError(f"texture_probability must be in [0, 1], got {texture_probability}")
        self.size = size
        self.textures = textures
        self.texture_probability = texture_probability

    def __call__(
        self, image: np.ndarray, foreground: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 [H, W, 3] RGB synthetic image, float32 [H, W] mask of 0 and 1) with H = W = size."""
        if image.shape != (self.size, self.size, 3) or foreground.shape != (self.size, self.size):
            expected = f"a {self.size}x{self.size} RGB image and foreground"
            raise ValueError(f"expected {expected}, got {image.shape} and {foreground.shape}")
        mask = self._anomaly_region(foreground, rng)
        source = augment_source(self._anomaly_source(image, rng), rng)
        beta = rng.uniform(*BETA_RANGE)
        blended = np.rint(beta * image.astype(np.float32) + (1 - beta) * source.astype(np.float32))
        synthetic = np.where(mask[..., None], blended.astype(np.uint8), image)
        return synthetic, mask.astype(np.float32)

    def _anomaly_region(self, foreground: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        regions = []
        for _ in range(MAX_REGION_TRIES):
            region = perlin_mask(self.size, rng)
            if (region & foreground).mean() >= MIN_ANOMALY_FRACTION:
                return region & foreground
            regions.append(region)
        # The foreground is too small to meet a Perlin region: anomalies may go anywhere.
        return max(regions, key=np.count_nonzero)

    def _anomaly_source(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.textures is not None and rng.random() < self.texture_probability:
            return self.textures(rng)
        return self_augmented(image, rng)


def list_textures(folder: Path) -> list[Path]:
    """All images under folder, recursively, sorted."""
    if not folder.is_dir():
        raise DataError(f"{folder}: texture folder not found")
    paths = sorted(path for path in folder.rglob("*") if is_image_file(path))
    if not paths:
        raise DataError(f"no images in {folder} or its subfolders")
    return paths

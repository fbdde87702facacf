"""Preview of the synthetic anomalies a training run would see, as PNG files to look at."""

import math
from pathlib import Path

import cv2
import numpy as np

from trainer.data.foreground import ForegroundMode, foreground_mask
from trainer.data.mvtec import DataError, read_rgb, scan_mvtec
from trainer.data.synthesis import (OBJECT_TEXTURE_PROBABILITY, AnomalySynthesizer, TextureSetting, resolve_textures,
                                    texture_source)

CONTOUR_RGB = (255, 0, 0)


def write_synthetic_samples(
    data_dir: Path,
    out_dir: Path,
    n: int,
    size: int,
    textures: TextureSetting,
    foreground: ForegroundMode,
    seed: int,
) -> list[Path]:
    """Writes n panels [normal | synthetic | mask | mask contour on synthetic] from train/good and grid.png.

    Returns the panel paths followed by the grid's.
    """
    if n < 1:
        raise ValueError(f"need at least one sample, got {n}")
    train = scan_mvtec(data_dir, require_test=False).train
    synthesizer = AnomalySynthesizer(
        size,
        texture_source(resolve_textures(textures, foreground), size),
        texture_probability=1.0 if foreground == "texture" else OBJECT_TEXTURE_PROBABILITY,
    )
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(train), size=n, replace=n > len(train))
    _make_folder(out_dir)

    panels, written = [], []
    for number, index in enumerate(chosen):
        normal = read_rgb(train[index], size)
        synthetic, mask = synthesizer(normal, foreground_mask(normal, foreground), rng)
        panels.append(_panel(normal, synthetic, mask))
        written.append(_write_png(out_dir / f"{number:03d}_{train[index].stem}.png", panels[-1]))
    written.append(_write_png(out_dir / "grid.png", _grid(panels)))
    return written


def _panel(normal: np.ndarray, synthetic: np.ndarray, mask: np.ndarray) -> np.ndarray:
    binary = mask.astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    outlined = cv2.drawContours(synthetic.copy(), contours, -1, CONTOUR_RGB, 1)
    return np.hstack([normal, synthetic, np.repeat(binary[..., None] * 255, 3, axis=2), outlined])


def _grid(panels: list[np.ndarray]) -> np.ndarray:
    """Panels in columns, black where the last column runs short; panels are 4:1, so about square."""
    columns = max(1, round(math.sqrt(len(panels)) / 2))
    rows = math.ceil(len(panels) / columns)
    blank = np.zeros_like(panels[0])
    padded = panels + [blank] * (rows * columns - len(panels))
    return np.hstack([np.vstack(padded[c * rows : (c + 1) * rows]) for c in range(columns)])


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create output folder {folder}: {err.strerror or err}") from err


def _write_png(path: Path, rgb: np.ndarray) -> Path:
    _, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    try:
        path.write_bytes(encoded.tobytes())
    except OSError as err:
        raise DataError(f"cannot write {path}: {err.strerror or err}") from err
    return path

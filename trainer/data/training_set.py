"""Torch datasets pairing normal images with synthetic anomalies, reproducible for any worker layout."""

import numpy as np
import torch
from torch.utils.data import Dataset

from trainer.data.synthesis import AnomalySynthesizer


def to_model_range(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32) / 127.5 - 1)


def _check_arrays(images: np.ndarray, foregrounds: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise ValueError(f"images must be uint8 [N>0, H, W, 3], got {images.dtype} {images.shape}")
    if foregrounds.dtype != np.bool_ or foregrounds.shape != images.shape[:3]:
        expected = f"bool {images.shape[:3]}"
        raise ValueError(f"foregrounds must be {expected}, got {foregrounds.dtype} {foregrounds.shape}")


def _synthesize(
    synthesizer: AnomalySynthesizer, image: np.ndarray, foreground: np.ndarray, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(anomalous [3, H, W] in [-1, 1], mask [1, H, W])."""
    synthetic, mask = synthesizer(image, foreground, rng)
    return to_model_range(synthetic), torch.from_numpy(mask)[None]


class TrainingPairs(Dataset):
    """Item i: normal image i and a synthetic anomaly made from a randomly chosen image.

    All randomness of item i comes from the seed sequence (seed, epoch, i), so an epoch's items are the
    same whatever the number of workers or the order in which they are fetched.
    """

    def __init__(
        self, images: np.ndarray, foregrounds: np.ndarray, synthesizer: AnomalySynthesizer, seed: int
    ):
        _check_arrays(images, foregrounds)
        self.images = images
        self.foregrounds = foregrounds
        self.synthesizer = synthesizer
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        # A random base image, so the normal and anomalous halves of a batch are not matched pairs.
        source = (index + int(rng.integers(len(self)))) % len(self)
        anomalous, mask = _synthesize(self.synthesizer, self.images[source], self.foregrounds[source], rng)
        return {"normal": to_model_range(self.images[index]), "anomalous": anomalous, "mask": mask}


class ValidationSet:
    """Normal validation images with one fixed synthetic anomaly each, made from the same image."""

    def __init__(
        self, images: np.ndarray, foregrounds: np.ndarray, synthesizer: AnomalySynthesizer, seed: int
    ):
        _check_arrays(images, foregrounds)
        pairs = [
            _synthesize(synthesizer, image, foreground, np.random.default_rng([seed, index]))
            for index, (image, foreground) in enumerate(zip(images, foregrounds))
        ]
        self.normal = torch.stack([to_model_range(image) for image in images])  # [N, 3, H, W]
        self.anomalous = torch.stack([anomalous for anomalous, _ in pairs])  # [N, 3, H, W]
        self.masks = torch.stack([mask for _, mask in pairs])  # [N, 1, H, W]

"""Torch datasets pairing normal images with synthetic anomalies, reproducible for any worker layout."""

import numpy as np
import torch
from torch.utils.data import Dataset

from trainer.data.synthesis import AnomalySynthesizer
from trainer.fused import model_input


def to_model_range(image: np.ndarray, channels: int) -> torch.Tensor:
    """uint8 RGB [H, W, 3] → float32 [channels, H, W] in [-1, 1], as the exported graph computes it."""
    return model_input(torch.from_numpy(image)[None], channels)[0]


def _check_arrays(images: np.ndarray, foregrounds: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise ValueError(f"images must be uint8 [N>0, H, W, 3], got {images.dtype} {images.shape}")
    if foregrounds.dtype != np.bool_ or foregrounds.shape != images.shape[:3]:
        expected = f"bool {images.shape[:3]}"
        raise ValueError(f"foregrounds must be {expected}, got {foregrounds.dtype} {foregrounds.shape}")


def _synthesize(
    synthesizer: AnomalySynthesizer, image: np.ndarray, foreground: np.ndarray, rng: np.random.Generator,
    channels: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(anomalous [channels, H, W] in [-1, 1], mask [1, H, W]); synthesis itself works in RGB."""
    synthetic, mask = synthesizer(image, foreground, rng)
    return to_model_range(synthetic, channels), torch.from_numpy(mask)[None]


class TrainingPairs(Dataset):
    """Item i: normal image i and a synthetic anomaly made from a randomly chosen image.

    All randomness of item i comes from the seed sequence (seed, epoch, i), so an epoch's items are the
    same whatever the number of workers or the order in which they are fetched.
    """

    def __init__(
        self, images: np.ndarray, foregrounds: np.ndarray, synthesizer: AnomalySynthesizer, seed: int, channels: int
    ):
        _check_arrays(images, foregrounds)
        self.channels = channels
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
        anomalous, mask = _synthesize(self.synthesizer, self.images[source], self.foregrounds[source], rng,
                                      self.channels)
        return {"normal": to_model_range(self.images[index], self.channels), "anomalous": anomalous, "mask": mask}


class ValidationSet:
    """Normal validation images with one fixed synthetic anomaly each, made from the same image."""

    def __init__(
        self, images: np.ndarray, foregrounds: np.ndarray, synthesizer: AnomalySynthesizer, seed: int, channels: int
    ):
        _check_arrays(images, foregrounds)
        pairs = [
            _synthesize(synthesizer, image, foreground, np.random.default_rng([seed, index]), channels)
            for index, (image, foreground) in enumerate(zip(images, foregrounds))
        ]
        self.normal = torch.stack([to_model_range(image, channels) for image in images])  # [N, C, H, W]
        self.anomalous = torch.stack([anomalous for anomalous, _ in pairs])  # [N, C, H, W]
        self.masks = torch.stack([mask for _, mask in pairs])  # [N, 1, H, W]

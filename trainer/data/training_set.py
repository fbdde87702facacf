"""Torch datasets pairing normal images with synthetic anomalies, reproducible for any worker layout."""

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from trainer.data.pose import PoseAugmentation
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


def random_tile(image: np.ndarray, foreground: np.ndarray, size: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random size × size tile of an image and its foreground; the image itself when it is that size
    (drawing nothing from `rng`)."""
    room = image.shape[0] - size
    if room == 0:
        return image, foreground
    y, x = rng.integers(room + 1, size=2)
    return image[y:y + size, x:x + size], foreground[y:y + size, x:x + size]


def fixed_tiles(images: np.ndarray, foregrounds: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One random tile of each image and of its foreground, the i-th drawn from the seed sequence (seed, i)."""
    pairs = [random_tile(image, foreground, size, np.random.default_rng([seed, i]))
             for i, (image, foreground) in enumerate(zip(images, foregrounds))]
    return np.stack([image for image, _ in pairs]), np.stack([foreground for _, foreground in pairs])


class TrainingPairs(Dataset):
    """Item (epoch, i): normal image i and a synthetic anomaly made from a randomly chosen image, each
    in a random pose of `pose`; for images larger than the synthesizer's size (tiled models), a
    random tile of each.

    All its randomness comes from the seed sequence (seed, epoch, i), so an epoch's items are the same
    whatever the number of workers or the order in which they are fetched.
    """

    def __init__(
        self, images: np.ndarray, foregrounds: np.ndarray, synthesizer: AnomalySynthesizer, seed: int, channels: int,
        pose: PoseAugmentation = PoseAugmentation(),
    ):
        _check_arrays(images, foregrounds)
        if images.shape[1] < synthesizer.size:
            raise ValueError(f"images of {images.shape[1]} px are smaller than the {synthesizer.size} px tiles")
        self.channels = channels
        self.images = images
        self.foregrounds = foregrounds
        self.synthesizer = synthesizer
        self.seed = seed
        self.pose = pose

    def __len__(self) -> int:
        return len(self.images)

    def _tile(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        posed = self.pose(self.images[index], self.foregrounds[index], rng)
        return random_tile(*posed, self.synthesizer.size, rng)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = key
        rng = np.random.default_rng([self.seed, epoch, index])
        # A random base image, so the normal and anomalous halves of a batch are not matched pairs.
        source = (index + int(rng.integers(len(self)))) % len(self)
        anomalous, mask = _synthesize(self.synthesizer, *self._tile(source, rng), rng, self.channels)
        normal, _ = self._tile(index, rng)
        return {"normal": to_model_range(normal, self.channels), "anomalous": anomalous, "mask": mask}


class TrainingKeys(Sampler):
    """(epoch, index) keys of TrainingPairs from a given step on, without end: each epoch this process's
    share of a seeded shuffle, cut to whole batches.

    One data loader then serves the whole run, so its worker processes start once. A loader per epoch
    forked the trainer at every epoch, and its steps ran slower while the fresh worker lived (most
    likely copy-on-write faults of the trainer's pages): on a set of 20-50 good images an epoch is a
    few steps.
    """

    def __init__(self, shares: DistributedSampler, batch_size: int, start_step: int):
        self.shares = shares
        self.batch_size = batch_size
        self.start_step = start_step

    def __iter__(self) -> Iterator[tuple[int, int]]:
        steps_per_epoch = len(self.shares) // self.batch_size
        epoch, skip = divmod(self.start_step, steps_per_epoch)
        while True:
            self.shares.set_epoch(epoch)
            # Resuming mid-epoch: skip the indices already consumed, without synthesising them.
            indices = list(self.shares)[skip * self.batch_size:steps_per_epoch * self.batch_size]
            yield from ((epoch, index) for index in indices)
            epoch, skip = epoch + 1, 0


class SyntheticDefects:
    """`count` synthetic defects made from held-out normal images, the j-th from image j mod N with
    the seed sequence (seed, j): the same set wherever and however often it is built."""

    def __init__(self, images: np.ndarray, foregrounds: np.ndarray, synthesizer: AnomalySynthesizer, seed: int,
                 channels: int, count: int):
        _check_arrays(images, foregrounds)
        pairs = [_synthesize(synthesizer, images[j % len(images)], foregrounds[j % len(images)],
                             np.random.default_rng([seed, j]), channels) for j in range(count)]
        self.images = torch.stack([anomalous for anomalous, _ in pairs])  # [M, C, H, W] in [-1, 1]
        self.masks = torch.stack([mask for _, mask in pairs])  # [M, 1, H, W]

    def bool_masks(self) -> np.ndarray:
        return self.masks[:, 0].numpy() > 0.5  # [M, H, W]


class ValidationSet:
    """Normal validation images with one fixed synthetic anomaly each, made from the same image."""

    def __init__(
        self, images: np.ndarray, foregrounds: np.ndarray, synthesizer: AnomalySynthesizer, seed: int, channels: int
    ):
        defects = SyntheticDefects(images, foregrounds, synthesizer, seed, channels, len(images))
        self.normal = torch.stack([to_model_range(image, channels) for image in images])  # [N, C, H, W]
        self.anomalous = defects.images  # [N, C, H, W]
        self.masks = defects.masks  # [N, 1, H, W]

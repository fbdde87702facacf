"""The one timing loop the benchmark scripts share (imported from the script's own folder)."""

import time
from collections.abc import Callable

import torch


def random_images(batch: int, size: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8)


def images_per_second(run: Callable[[torch.Tensor], object], images: torch.Tensor, seconds: float) -> float:
    """One warm-up call, then as many calls as fit in `seconds` (at least one)."""
    run(images)
    runs, start = 0, time.perf_counter()
    while runs == 0 or time.perf_counter() - start < seconds:
        run(images)
        runs += 1
    return runs * images.shape[0] / (time.perf_counter() - start)

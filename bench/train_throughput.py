"""Training throughput and peak memory per profile: images/s of the joint objective (forward +
backward + Adam, fp32, channels_last) with synthetic batches (B normal + B anomalous), and the
peak RSS of a fresh process that runs only that profile.

    .venv/bin/python bench/train_throughput.py [--profiles tiny small paper] [--steps 2]
"""

import argparse
import multiprocessing
import resource
import time

import torch

from trainer.method import MethodConfig
from trainer.model import DiffusionAD
from trainer.objective import JointObjective, draw_step_randomness
from trainer.profiles import PROFILES

BATCH = {"tiny": 8, "small": 8, "paper": 1}  # normal images per step (as many synthetic ones are added)


def measure(name: str, steps: int) -> tuple[float, float]:
    """(seconds per step, peak RSS in GB) of one profile, in the calling process."""
    method, profile, batch = MethodConfig(), PROFILES[name], BATCH[name]
    torch.manual_seed(0)
    model = DiffusionAD(profile).to(memory_format=torch.channels_last)
    objective = JointObjective(model, method)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    size = profile.image_size
    generator = torch.Generator().manual_seed(0)
    normal, anomalous = torch.rand(2, batch, 3, size, size) * 2 - 1
    mask = (torch.rand(batch, 1, size, size) > 0.9).float()

    def step() -> None:
        randomness = draw_step_randomness(2 * batch, (3, size, size), method, generator)
        loss, _, _ = objective(normal, anomalous, mask, *randomness)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up (allocator, Adam state)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    per_step = (time.perf_counter() - start) / steps
    return per_step, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", nargs="+", default=list(PROFILES), choices=list(PROFILES))
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    args = parser.parse_args()
    print("### Training\n")
    print("| profile | input | images per step | s / step | training images/s | peak RSS |")
    print("|---|---|---|---|---|---|")
    spawn = multiprocessing.get_context("spawn")  # a fresh process per profile: its own peak RSS
    for name in args.profiles:
        with spawn.Pool(1) as pool:
            per_step, peak_gb = pool.apply(measure, (name, args.steps))
        images = 2 * BATCH[name]
        print(f"| {name} | {PROFILES[name].image_size}² | {images} | {per_step:.2f} | {images / per_step:.2f} "
              f"| {peak_gb:.2f} GB |", flush=True)


if __name__ == "__main__":
    main()

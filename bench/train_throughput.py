"""Training throughput and peak memory per profile and precision: images/s of the joint objective
(forward + backward + Adam, channels_last; fp32, and bf16 autocast where the CPU has native bf16,
as `precision = "auto"` then trains) with synthetic batches (B normal + B anomalous), and the peak RSS
of a fresh process that runs only that measurement.

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
from trainer.precision import autocast, resolve_precision

BATCH = {"tiny": 8, "small": 8, "paper": 1}  # normal images per step (as many synthetic ones are added)


def measure(name: str, precision: str, steps: int) -> tuple[float, float]:
    """(seconds per step, peak RSS in GB) of one profile and precision, in the calling process."""
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
        with autocast(precision, torch.device("cpu")):
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
    # bf16 where `precision = "auto"` trains in it (native bf16 on this CPU); elsewhere it is emulated.
    precisions = ["fp32", "bf16"] if resolve_precision("auto", torch.device("cpu"))[0] == "bf16" else ["fp32"]
    print("| profile | input | precision | images per step | s / step | training images/s | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    spawn = multiprocessing.get_context("spawn")  # a fresh process per measurement: its own peak RSS
    for name in args.profiles:
        for precision in precisions:
            with spawn.Pool(1) as pool:
                per_step, peak_gb = pool.apply(measure, (name, precision, args.steps))
            images = 2 * BATCH[name]
            print(f"| {name} | {PROFILES[name].image_size}² | {precision} | {images} | {per_step:.2f} | "
                  f"{images / per_step:.2f} | {peak_gb:.2f} GB |", flush=True)


if __name__ == "__main__":
    main()

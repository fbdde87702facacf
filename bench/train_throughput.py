"""Training throughput per profile: images/s of the joint objective (forward + backward + Adam)
on this machine, with synthetic batches (B normal + B anomalous), measured in one run.

    .venv/bin/python bench/train_throughput.py [--profiles tiny small paper] [--steps 3]
"""

import argparse
import os
import platform
import resource
import time

import torch

from trainer.method import MethodConfig
from trainer.model import DiffusionAD
from trainer.objective import JointObjective, draw_step_randomness
from trainer.profiles import PROFILES

BATCH = {"tiny": 8, "small": 8, "paper": 1}  # normal images per step (as many synthetic ones are added)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", nargs="+", default=list(PROFILES), choices=list(PROFILES))
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    args = parser.parse_args()
    method = MethodConfig()
    print(f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, fp32, channels_last")
    print("| profile | input | images per step | s / step | training images/s |")
    print("|---|---|---|---|---|")
    for name in args.profiles:
        profile, batch = PROFILES[name], BATCH[name]
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

        step()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        per_step = (time.perf_counter() - start) / args.steps
        print(f"| {name} | {size}² | {2 * batch} | {per_step:.2f} | {2 * batch / per_step:.2f} |", flush=True)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"\npeak RSS of this process (all profiles): {peak_gb:.1f} GB")


if __name__ == "__main__":
    main()

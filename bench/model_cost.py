"""Cost of the fused one-step inference per profile: parameters, GFLOP (torch's FLOP counter) and
eager images/s at batch 1 and 8 on this machine, measured in one run.

    .venv/bin/python bench/model_cost.py [--profiles tiny small paper] [--seconds 5]
"""

import argparse
import os
import platform

import torch
from torch.utils.flop_counter import FlopCounterMode

from timing import images_per_second, random_images
from trainer.method import MethodConfig
from trainer.model import DiffusionAD
from trainer.profiles import PROFILES


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", nargs="+", default=list(PROFILES), choices=list(PROFILES))
    parser.add_argument("--seconds", type=float, default=5.0, help="minimum timing per measurement")
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| profile | input | denoiser params | segmenter params | GFLOP / image | images/s b=1 | images/s b=8 |")
    print("|---|---|---|---|---|---|---|")
    for name in args.profiles:
        profile = PROFILES[name]
        model = DiffusionAD(profile).eval()
        fused = model.fused(MethodConfig()).eval()
        size = profile.image_size
        with FlopCounterMode(display=False) as counter:
            fused(torch.zeros((1, size, size, 3), dtype=torch.uint8))
        params = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (model.denoiser, model.segmenter)]
        rates = [images_per_second(fused, random_images(b, size), args.seconds) for b in (1, 8)]
        print(f"| {name} | {size}² | {params[0]:.2f} M | {params[1]:.2f} M | {counter.get_total_flops() / 1e9:.1f} "
              f"| {rates[0]:.2f} | {rates[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()

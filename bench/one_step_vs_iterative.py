"""Norm-guided one-step inference vs iterative DDPM reconstruction from t = 400 (same model, same
images, eager fp32): images/s of each and their ratio, measured in one run on this machine.
The iterative baseline reconstructs (t_b + 1 denoiser passes), then runs the same segmenter.

    .venv/bin/python bench/one_step_vs_iterative.py [--profile small] [--images 2]
"""

import argparse
import os
import platform
import time

import torch

from trainer.diffusion import ddpm_reconstruct, linear_alpha_bars, top_k_mean
from trainer.fused import uint8_nhwc_to_unit_range
from trainer.method import MethodConfig
from trainer.model import DiffusionAD
from trainer.profiles import PROFILES


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="small", choices=list(PROFILES))
    parser.add_argument("--images", type=int, default=2, help="batch of images scored by both methods")
    args = parser.parse_args()
    method, profile = MethodConfig(), PROFILES[args.profile]
    torch.manual_seed(0)
    model = DiffusionAD(profile).eval()
    fused = model.fused(method).eval()
    size = profile.image_size
    images = torch.randint(0, 256, (args.images, size, size, 3), dtype=torch.uint8)
    alpha_bars = linear_alpha_bars(method.num_timesteps, method.beta_start, method.beta_end)

    def iterative() -> torch.Tensor:
        x0 = uint8_nhwc_to_unit_range(images)
        recon = ddpm_reconstruct(model.denoiser, x0, alpha_bars, method.t_b, torch.Generator().manual_seed(0))
        return top_k_mean(model.segmenter(torch.cat([x0, recon], dim=1))[:, 0], method.top_k)

    fused(images)  # warm-up
    start = time.perf_counter()
    fused(images)
    one_step = args.images / (time.perf_counter() - start)
    start = time.perf_counter()
    iterative()
    iterative_rate = args.images / (time.perf_counter() - start)
    print(f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, profile {args.profile}, "
          f"batch {args.images}")
    print("| method | denoiser passes / image | images/s |")
    print("|---|---|---|")
    print(f"| norm-guided one-step (t_s={method.t_s}, t_b={method.t_b}) | 2 | {one_step:.3f} |")
    print(f"| iterative DDPM from t={method.t_b} | {method.t_b + 1} | {iterative_rate:.4f} |")
    print(f"\none-step / iterative: {one_step / iterative_rate:.0f}×")


if __name__ == "__main__":
    main()

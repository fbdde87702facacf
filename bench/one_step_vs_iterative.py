"""Norm-guided one-step inference vs iterative DDPM reconstruction from t = t_b = 400: the same
model, the same images, the same batch, both eager fp32 in this process. The iterative baseline
reconstructs with t_b + 1 denoiser passes, then runs the same segmenter and top-K score.

    .venv/bin/python bench/one_step_vs_iterative.py [--profile small] [--images 2]
"""

import argparse
import time

import torch

from model_cost import gflop, gflop_per_image
from timing import images_per_second
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
    parser.add_argument("--seconds", type=float, default=5.0, help="minimum timing of the one-step method")
    args = parser.parse_args()
    method, profile = MethodConfig(), PROFILES[args.profile]
    torch.manual_seed(0)
    model = DiffusionAD(profile).eval()
    fused = model.fused(method).eval()
    size = profile.image_size
    images = torch.randint(0, 256, (args.images, size, size, 3), dtype=torch.uint8)
    alpha_bars = linear_alpha_bars(method.num_timesteps, method.beta_start, method.beta_end)
    passes = method.t_b + 1

    def iterative(batch: torch.Tensor) -> torch.Tensor:
        x0 = uint8_nhwc_to_unit_range(batch)
        recon = ddpm_reconstruct(model.denoiser, x0, alpha_bars, method.t_b, torch.Generator().manual_seed(0))
        return top_k_mean(model.segmenter(torch.cat([x0, recon], dim=1))[:, 0], method.top_k)

    one_step_rate = images_per_second(fused, images, args.seconds)
    # Warm-up: one denoiser pass at the iterative's shapes (a whole 401-pass run would double its cost).
    model.denoiser(uint8_nhwc_to_unit_range(images), torch.full((args.images,), method.t_b, dtype=torch.long))
    start = time.perf_counter()
    iterative(images)
    iterative_rate = args.images / (time.perf_counter() - start)
    x = torch.zeros(1, 3, size, size)
    pass_gflop = gflop(model.denoiser, x, torch.tensor([method.t_b]))
    segmenter_gflop = gflop(model.segmenter, torch.cat([x, x], dim=1))
    one_step_gflop = gflop_per_image(fused, size)
    iterative_gflop = passes * pass_gflop + segmenter_gflop
    print(f"### One step vs iterative ({args.profile}, batch {args.images})\n")
    print("| method | denoiser passes / image | GFLOP / image | images/s |")
    print("|---|---|---|---|")
    print(f"| norm-guided one-step (t_s={method.t_s}, t_b={method.t_b}) | 2 | {one_step_gflop:.1f} "
          f"| {one_step_rate:.3f} |")
    print(f"| iterative DDPM from t={method.t_b} | {passes} | {iterative_gflop:.0f} | {iterative_rate:.4f} |")
    print(f"\none-step / iterative: **{one_step_rate / iterative_rate:.0f}×** measured; the FLOP ratio, "
          f"which bounds it when both use the hardware equally well, is {iterative_gflop / one_step_gflop:.0f}×.")


if __name__ == "__main__":
    main()

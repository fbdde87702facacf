"""Cost of the fused one-step inference per profile: parameters and GFLOP per inspected image
(two denoiser passes + segmenter + the steps around them), counted with torch's FLOP counter
(2 FLOPs per multiply-add).

    .venv/bin/python bench/model_cost.py [--profiles tiny small paper]
"""

import argparse
from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from trainer.fused import FusedInference
from trainer.method import MethodConfig
from trainer.model import DiffusionAD
from trainer.profiles import PROFILES


def gflop(run: Callable, *inputs: torch.Tensor) -> float:
    """GFLOP of one call. Attention runs through SDPA's math kernel here: the counter has no
    formula for the fused CPU kernel and would leave attention out."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        run(*inputs)
    return counter.get_total_flops() / 1e9


def gflop_per_image(fused: FusedInference, image_size: int) -> float:
    return gflop(fused, torch.zeros((1, image_size, image_size, 3), dtype=torch.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", nargs="+", default=list(PROFILES), choices=list(PROFILES))
    args = parser.parse_args()
    print("### Model cost per profile\n")
    print("| profile | input | denoiser params | segmenter params | GFLOP / image |")
    print("|---|---|---|---|---|")
    for name in args.profiles:
        profile = PROFILES[name]
        model = DiffusionAD(profile).eval()
        params = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (model.denoiser, model.segmenter)]
        gflop = gflop_per_image(model.fused(MethodConfig()).eval(), profile.image_size)
        print(f"| {name} | {profile.image_size}² | {params[0]:.2f} M | {params[1]:.2f} M | {gflop:.1f} |", flush=True)


if __name__ == "__main__":
    main()

"""Cost of inference per profile and head: parameters, and GFLOP per inspected image counted with
torch's FLOP counter (2 FLOPs per multiply-add). Norm-guided: two denoiser passes + segmenter + the
steps around them; RADAR: one denoiser pass + filters and features. A tiled model (n tiles a side)
runs them on n² tiles of the profile's size per frame.

    .venv/bin/python bench/model_cost.py [--profiles tiny small paper] [--tiles-per-side 1 3 5]
"""

import argparse
from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from trainer.method import MethodConfig
from trainer.model import DiffusionAD
from trainer.profiles import PROFILES
from trainer.radar import RadarConstants, feature_window


def gflop(run: Callable, *inputs: torch.Tensor) -> float:
    """GFLOP of one call. Attention runs through SDPA's math kernel here: the counter has no
    formula for the fused CPU kernel and would leave attention out."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        run(*inputs)
    return counter.get_total_flops() / 1e9


def gflop_per_image(head: torch.nn.Module, image_size: int) -> float:
    return gflop(head, torch.zeros((1, image_size, image_size, 3), dtype=torch.uint8))


def inference_heads(model: DiffusionAD) -> dict[str, torch.nn.Module]:
    """Both heads' graphs over one model, by head name. RADAR at t=50 on the residual: its cost does
    not depend on the constants a run chooses."""
    constants = RadarConstants(t=50, discrepancy="residual", window=feature_window(model.image_size), map_scale=1.0)
    return {"norm-guided": model.fused(MethodConfig()).eval(), "radar": model.radar(MethodConfig(), constants).eval()}


def print_row(name: str, tiles_per_side: int) -> None:
    model = DiffusionAD(PROFILES[name], tiles_per_side=tiles_per_side).eval()
    params = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (model.denoiser, model.segmenter)]
    cost = {head: gflop_per_image(graph, model.frame_size) for head, graph in inference_heads(model).items()}
    tiling = f" ({tiles_per_side}×{tiles_per_side} of {model.image_size}²)" if tiles_per_side > 1 else ""
    print(f"| {name} | {model.frame_size}²{tiling} | {params[0]:.2f} M | {params[1]:.2f} M | {cost['norm-guided']:.1f} "
          f"| {cost['radar']:.1f} | {cost['radar'] / cost['norm-guided']:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", nargs="+", default=list(PROFILES), choices=list(PROFILES))
    parser.add_argument("--tiles-per-side", nargs="+", type=int, default=[1])
    args = parser.parse_args()
    print("### Model cost per profile\n")
    print("| profile | input | denoiser params | segmenter params | GFLOP / image, norm-guided | "
          "GFLOP / image, RADAR | RADAR / norm-guided |")
    print("|---|---|---|---|---|---|---|")
    for name in args.profiles:
        for tiles in args.tiles_per_side:
            print_row(name, tiles)


if __name__ == "__main__":
    main()

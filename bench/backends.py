"""Inference backends per profile: eager module, exported program (what `exported-cpu` runs) and
the AOTInductor package (`aoti-cpu`), images/s at batch 1 and 8, measured in one run on this
machine. Weights are random (speed does not depend on them); the graph is the bundle's graph.

    .venv/bin/python bench/backends.py [--profiles tiny small] [--seconds 5]
"""

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from timing import images_per_second, random_images
from trainer.export.program import export_fused
from trainer.method import MethodConfig
from trainer.model import DiffusionAD
from trainer.profiles import PROFILES

BATCHES = (1, 8)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", nargs="+", default=["tiny", "small"], choices=list(PROFILES))
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    print(f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| profile | backend | " + " | ".join(f"images/s b={b}" for b in BATCHES) + " | vs eager b=8 | compile s |")
    print("|---|---|" + "---|" * len(BATCHES) + "---|---|")
    for name in args.profiles:
        profile = PROFILES[name]
        size = profile.image_size
        torch.manual_seed(0)
        fused = DiffusionAD(profile).eval().fused(MethodConfig()).eval()
        with torch.no_grad():
            program = export_fused(fused, size, max(BATCHES))
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            package = Path(tmp) / "model.cpu.pt2"
            torch._inductor.aoti_compile_and_package(program, package_path=str(package))
            aoti = torch._inductor.aoti_load_package(str(package))
            compile_s = time.perf_counter() - start
            runners = {"eager": (fused, "-"), "exported-cpu": (program.module(), "-"),
                       "aoti-cpu": (aoti, f"{compile_s:.0f}")}
            eager_b8 = None
            for backend, (run, compile_text) in runners.items():
                rates = [images_per_second(run, random_images(b, size), args.seconds) for b in BATCHES]
                eager_b8 = eager_b8 or rates[-1]
                print(f"| {name} | {backend} | " + " | ".join(f"{r:.2f}" for r in rates)
                      + f" | {rates[-1] / eager_b8:.2f}× | {compile_text} |", flush=True)


if __name__ == "__main__":
    main()

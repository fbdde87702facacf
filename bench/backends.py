"""Inference backends per profile and head: the eager module, the exported program (what
`exported-cpu` runs), the AOTInductor package (`aoti-cpu`, compiled as `trainer export` compiles
it) and the OpenVINO IR, fp32, INT8 and (where the CPU has it) bf16 (`openvino-cpu`, converted and
quantised as `trainer export` does, compiled as a station compiles it): images/s at batch 1, 4 and
8, and FLOP efficiency — achieved GFLOP/s over this machine's matrix-multiply peak in the file's
precision, measured at the start of the same run. Weights are random and INT8 is calibrated on
random images (speed depends on neither); the graphs are the bundle's graphs.

    .venv/bin/python bench/backends.py [--profiles tiny small] [--seconds 5]
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from edge.runtime.cpu_features import station_cpu_features
from edge.runtime.openvino import compile_cpu
from machine import gemm_peak_gflops
from model_cost import gflop_per_image, inference_heads
from protocols.bundle import InputSpec
from timing import images_per_second, random_images
from trainer.export.aoti import compile_aoti_package
from trainer.export.openvino import BF16_CPU_FEATURES, quantise, to_openvino
from trainer.export.program import export_head
from trainer.model import DiffusionAD
from trainer.profiles import PROFILES

BATCHES = (1, 4, 8)
PRECISIONS = ("fp32", "bf16", "int8")


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", nargs="+", default=["tiny", "small"], choices=list(PROFILES))
    parser.add_argument("--seconds", type=float, default=5.0, help="minimum timing per measurement")
    args = parser.parse_args()
    peaks = {precision: gemm_peak_gflops(precision) for precision in PRECISIONS}
    print("### Inference backends\n")
    print("Matrix-multiply peaks measured in this run (best of 1024², 2048², 3072²): "
          + ", ".join(f"**{precision} {peak:.1f} GFLOP/s**" for precision, peak in peaks.items())
          + " (fp32 and bf16 `torch.mm`, int8 `torch._int_mm`). Cells: images/s (GFLOP/s as % of the peak of "
          "the file's precision). The INT8 file is calibrated on random images: its speed does not depend on what "
          "it was calibrated on.\n")
    print("| profile | head | GFLOP / image | backend | precision | " + " | ".join(f"b={b}" for b in BATCHES)
          + f" | vs eager at b={BATCHES[-1]} | compile s |")
    print("|---|---|---|---|---|" + "---|" * len(BATCHES) + "---|---|")
    for name in args.profiles:
        profile = PROFILES[name]
        size = profile.image_size
        torch.manual_seed(0)
        for head, graph in inference_heads(DiffusionAD(profile).eval()).items():
            gflop = gflop_per_image(graph, size)
            program = export_head(graph, size, max(BATCHES))
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                package, _ = compile_aoti_package(program, Path(tmp) / "model.cpu.pt2")
                aoti = torch._inductor.aoti_load_package(str(package))
                compile_s = time.perf_counter() - start
                runners = {("eager", "fp32"): (graph, "-"), ("exported-cpu", "fp32"): (program.module(), "-"),
                           ("aoti-cpu", "fp32"): (aoti, f"{compile_s:.0f}"),
                           **openvino_runners(program, InputSpec(height=size, width=size, max_batch=max(BATCHES)))}
                eager_last = None
                for (backend, precision), (run, compile_text) in runners.items():
                    rates = [images_per_second(run, random_images(b, size), args.seconds) for b in BATCHES]
                    eager_last = eager_last or rates[-1]
                    cells = " | ".join(f"{r:.2f} ({100 * r * gflop / peaks[precision]:.0f} %)" for r in rates)
                    print(f"| {name} | {head} | {gflop:.1f} | {backend} | {precision} | {cells} | "
                          f"{rates[-1] / eager_last:.2f}× | {compile_text} |", flush=True)


def openvino_runners(program: torch.export.ExportedProgram, spec: InputSpec) -> dict:
    """The fp32, INT8 and (where this CPU computes it) bf16 IR as runners of uint8 tensors, keyed
    by backend and precision, each with its conversion (and quantisation) seconds."""
    start = time.perf_counter()
    fp32 = to_openvino(program, spec)
    convert_s = time.perf_counter() - start
    start = time.perf_counter()
    int8 = quantise(fp32, random_images(spec.max_batch, spec.height).numpy())
    quantise_s = time.perf_counter() - start
    runners = {("openvino-cpu", "fp32"): (_uint8_runner(fp32, "fp32"), f"{convert_s:.0f}"),
               ("openvino-cpu", "int8"): (_uint8_runner(int8, "int8"), f"{convert_s + quantise_s:.0f}")}
    if set(BF16_CPU_FEATURES) <= station_cpu_features():
        runners["openvino-cpu", "bf16"] = (_uint8_runner(fp32, "bf16"), f"{convert_s:.0f}")
    return runners


def _uint8_runner(model, precision: str):
    compiled = compile_cpu(model, precision)
    return lambda images: compiled(images.numpy())


if __name__ == "__main__":
    main()

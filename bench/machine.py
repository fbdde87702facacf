"""What the figures were measured on, and the machine's measured fp32 matrix-multiply peak: the
yardstick for FLOP efficiency, measured in the same run as the figures it divides."""

import os
import platform
import time
from pathlib import Path

import torch

from edge.runtime.cpu_features import station_cpu_features

SGEMM_SIZES = (1024, 2048, 3072)


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    total_kib = int(meminfo.read_text().split("MemTotal:")[1].split()[0])
    return total_kib / 2**20


def vector_extensions() -> str:
    """The wide-vector and low-precision extensions the CPU reports: the same cloud machine type has
    come with AVX-512/VNNI/BF16 on some days and AVX2 only on others."""
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return " ".join(f for f in wanted if f in station_cpu_features()) or "none of AVX2/AVX-512"


def describe() -> str:
    memory = memory_gib()
    return (f"{cpu_model()} ({vector_extensions()}; torch kernels: {torch.backends.cpu.get_cpu_capability()}), "
            f"{os.cpu_count()} logical cores, "
            f"{f'{memory:.0f} GiB RAM, ' if memory else ''}{platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} intra-op threads)")


def sgemm_peak_gflops(seconds_per_size: float = 2.0) -> float:
    """Best fp32 GFLOP/s of square torch.mm over a few sizes (2·n³ FLOPs per product)."""
    best = 0.0
    for n in SGEMM_SIZES:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)  # warm-up
        products, start = 0, time.perf_counter()
        while products == 0 or time.perf_counter() - start < seconds_per_size:
            torch.mm(a, b)
            products += 1
        best = max(best, 2 * n**3 * products / (time.perf_counter() - start) / 1e9)
    return best


if __name__ == "__main__":
    print(describe())
    print(f"sgemm peak: {sgemm_peak_gflops():.1f} GFLOP/s")

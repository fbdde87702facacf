"""What the figures were measured on, and the machine's measured matrix-multiply peaks (fp32, bf16,
int8): the yardsticks for FLOP efficiency, measured in the same run as the figures they divide."""

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from edge.runtime.cpu_features import station_cpu_features

GEMM_SIZES = (1024, 2048, 3072)


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


def _product(n: int, precision: str) -> Callable[[], torch.Tensor]:
    """A square matrix product in `precision`: torch.mm in fp32 or bf16 (oneDNN; AMX where the CPU
    has it), torch._int_mm for int8 (int8 in, int32 accumulated: what VNNI and AMX-INT8 compute)."""
    if precision == "int8":
        a, b = (torch.randint(-128, 128, (n, n), dtype=torch.int8) for _ in range(2))
        return lambda: torch._int_mm(a, b)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return lambda: torch.mm(a, b)


def gemm_peak_gflops(precision: str = "fp32", seconds_per_size: float = 2.0) -> float:
    """Best GFLOP/s (int8: GOP/s) of square matrix products in `precision` over a few sizes
    (2·n³ operations per product)."""
    best = 0.0
    for n in GEMM_SIZES:
        product = _product(n, precision)
        product()  # warm-up
        products, start = 0, time.perf_counter()
        while products == 0 or time.perf_counter() - start < seconds_per_size:
            product()
            products += 1
        best = max(best, 2 * n**3 * products / (time.perf_counter() - start) / 1e9)
    return best


if __name__ == "__main__":
    print(describe())
    for precision in ("fp32", "bf16", "int8"):
        print(f"{precision} GEMM peak: {gemm_peak_gflops(precision):.1f} GFLOP/s")

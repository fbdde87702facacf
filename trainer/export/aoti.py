"""The AOTInductor CPU package: the exported program compiled ahead of time to a shared library."""

import platform
from pathlib import Path

import torch

# The package targets x86-64-v3 (AVX2, FMA: Intel since Haswell, AMD since Zen) with 256-bit
# vectors, not the build machine: Inductor's default (-march=native, the widest vectors there)
# made a package built on an AVX-512 machine die with SIGILL on an AVX2 station. The library's
# convolutions and GEMMs (oneDNN, MKL) still pick the station's widest instructions at run time.
TARGET_ISA = {"cpp.march": "x86-64-v3", "cpp.simdlen": 256}
# What x86-64-v3 requires, as /proc/cpuinfo names it: the bundle records it, the station checks it.
X86_64_V3_FEATURES = ("abm", "avx", "avx2", "bmi1", "bmi2", "cx16", "f16c", "fma", "lahf_lm", "movbe", "popcnt",
                      "sse4_1", "sse4_2", "ssse3", "xsave")
# Freezing folds the weights into the compiled graph as constants, which lets Inductor pre-pack
# them for oneDNN's convolutions and fold constant arithmetic (the noise terms) at compile time.
COMPILE_OPTIONS = {"freezing": True, **TARGET_ISA}


def can_compile_here() -> bool:
    return platform.machine() in ("x86_64", "AMD64")


def compile_aoti_package(program: torch.export.ExportedProgram, path: Path) -> tuple[Path, list[str]]:
    """The package at `path` and the CPU features a station needs to run it."""
    torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=COMPILE_OPTIONS)
    return path, list(X86_64_V3_FEATURES)

"""The AOTInductor CPU package: the exported program compiled ahead of time to a shared library."""

from pathlib import Path

import torch

# Freezing folds the weights into the compiled graph as constants, which lets Inductor pre-pack
# them for oneDNN's convolutions and fold constant arithmetic (the noise terms) at compile time.
COMPILE_OPTIONS = {"freezing": True}


def compile_aoti_package(program: torch.export.ExportedProgram, path: Path) -> Path:
    torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=COMPILE_OPTIONS)
    return path

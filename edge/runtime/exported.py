"""The portable torch.export program, on the CPU or on a CUDA GPU."""

from pathlib import Path

import numpy as np
import torch

from edge.runtime.backend import Backend
from edge.runtime.program_archive import load_program
from protocols.bundle import BundleFile, Manifest


class ExportedCpuBackend(Backend):
    key = "exported-cpu"
    formats = ("torch.export",)
    target = "cpu"
    device = torch.device("cpu")

    @classmethod
    def available(cls) -> bool:
        return True

    def __init__(self, path: Path, entry: BundleFile, manifest: Manifest):
        program = load_program(path)
        if self.device.type != "cpu":
            program = torch.export.passes.move_to_device_pass(program, self.device)
        self.module = program.module()

    @torch.inference_mode()
    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = self.module(torch.from_numpy(images).to(self.device))
        return maps.float().cpu().numpy(), scores.float().cpu().numpy()


class ExportedCudaBackend(ExportedCpuBackend):
    key = "exported-cuda"
    device = torch.device("cuda")

    @classmethod
    def available(cls) -> bool:
        return torch.cuda.is_available()

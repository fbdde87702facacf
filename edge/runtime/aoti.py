"""The ahead-of-time compiled CPU package (AOTInductor): no Python graph at run time."""

from pathlib import Path

import numpy as np
import torch

from edge.runtime.backend import Backend
from protocols.bundle import Manifest


class AotiCpuBackend(Backend):
    key = "aoti-cpu"
    formats = ("aoti-package",)
    target = "cpu"

    @classmethod
    def available(cls) -> bool:
        return True

    def __init__(self, path: Path, manifest: Manifest):
        self.runner = torch._inductor.aoti_load_package(str(path))

    @torch.inference_mode()
    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = self.runner(torch.from_numpy(images))
        return maps.numpy(), scores.numpy()

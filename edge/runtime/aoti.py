"""The ahead-of-time compiled CPU package (AOTInductor): no Python graph at run time.

The package is a zip holding a compiled shared library, which torch extracts and loads: it is
native code and runs as the station's user. Only a bundle signature (trusted_keys_dir) says who
built it; the file loaded is the verified private copy."""

from pathlib import Path

import numpy as np
import torch

from edge.runtime.backend import Backend
from edge.runtime.program_archive import weights_only_unpickling
from protocols.bundle import BundleFile, Manifest


class AotiCpuBackend(Backend):
    key = "aoti-cpu"
    formats = ("aoti-package",)
    target = "cpu"

    @classmethod
    def available(cls) -> bool:
        return True

    def __init__(self, path: Path, entry: BundleFile, manifest: Manifest):
        with weights_only_unpickling():  # the package's weights, if any were pickled
            self.runner = torch._inductor.aoti_load_package(str(path))

    @torch.inference_mode()
    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = self.runner(torch.from_numpy(images))
        return maps.numpy(), scores.numpy()

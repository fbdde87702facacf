"""The TensorRT backend: runs a bundle's torch-tensorrt file (an ExportedProgram holding the
engine) on an NVIDIA GPU.

The only edge module that imports torch_tensorrt, and only inside functions: a CPU station
never needs it installed.
"""

from pathlib import Path

import numpy as np
import torch

from edge.runtime.backend import Backend, BackendUnavailable
from protocols.bundle import Manifest


class TensorRTBackend(Backend):
    key = "tensorrt"
    formats = ("torch-tensorrt",)
    target = "tensorrt"

    @classmethod
    def available(cls) -> bool:
        if not torch.cuda.is_available():
            return False
        try:
            import torch_tensorrt  # noqa: F401
        except Exception:  # it raises a bare Exception when TensorRT's own libraries are missing
            return False
        return True

    def __init__(self, path: Path, manifest: Manifest):
        if not self.available():
            raise BackendUnavailable("the TensorRT backend needs a CUDA GPU and torch-tensorrt")
        import torch_tensorrt

        # Importing torch_tensorrt registers the tensorrt::execute_engine op the saved graph calls.
        self.module = torch_tensorrt.load(str(path)).module()

    @torch.inference_mode()
    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        anomaly_map, score = self.module(torch.from_numpy(images).to("cuda"))
        return anomaly_map.float().cpu().numpy(), score.float().cpu().numpy()

"""The TensorRT backend: runs a bundle's torch-tensorrt file (an ExportedProgram holding the
engine) on an NVIDIA GPU.

The only edge module that imports torch_tensorrt, and only inside functions: a CPU station
never needs it installed.
"""

from pathlib import Path

import numpy as np
import torch

from edge.runtime.backend import Backend, BackendUnavailable
from edge.runtime.program_archive import load_program
from protocols.bundle import BundleFile, Manifest


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

    def __init__(self, path: Path, entry: BundleFile, manifest: Manifest):
        if not self.available():
            raise BackendUnavailable("the TensorRT backend needs a CUDA GPU and torch-tensorrt")
        import torch_tensorrt  # noqa: F401  (registers the tensorrt::execute_engine op the graph calls)
        from torch_tensorrt._features import ENABLED_FEATURES

        if not ENABLED_FEATURES.torch_tensorrt_runtime:
            import torch_tensorrt.dynamo.runtime._TRTEngine  # noqa: F401  (its Python twin of that op)
        # Not torch_tensorrt.load: when torch.export.load fails it tries torch.jit.load, which
        # would run a TorchScript file. The engine is a TorchScript-pickled object TensorRT
        # deserialises (native code, like the AOT package: the bundle signature vouches for it).
        self.module = load_program(path, allow_script_objects=True).module()

    @torch.inference_mode()
    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        anomaly_map, score = self.module(torch.from_numpy(images).to("cuda"))
        return anomaly_map.float().cpu().numpy(), score.float().cpu().numpy()

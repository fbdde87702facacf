"""OpenVINO's CPU runtime over the bundle's IR files, fp32 or INT8.

An IR is an XML description of the graph and a raw weights file beside it (<name>.bin, which
OpenVINO finds by the XML's name): OpenVINO parses the one and reads the other as bytes. Nothing is
unpickled and no code comes from the bundle; OpenVINO's own CPU plugin compiles the graph at load.
The files loaded are the verified private copies."""

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from edge.runtime.backend import Backend
from protocols.bundle import Manifest

if TYPE_CHECKING:  # imported when used: a station without it still loads the other backends
    import openvino


def compile_cpu(model: "openvino.Model") -> "openvino.CompiledModel":
    """An OpenVINO model compiled as the station runs it."""
    import openvino

    return openvino.Core().compile_model(model, "CPU", {
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),  # the share of the cores torch was given
        "PERFORMANCE_HINT": "LATENCY",  # one stream: a batch at a time, as the daemon sends them
        # An fp32 file stays fp32 on a CPU with bf16 (OpenVINO's default there); an INT8 file keeps
        # fp32 between its INT8 layers, as its parity was measured at export.
        "INFERENCE_PRECISION_HINT": "f32",
    })


class OpenVinoCpuBackend(Backend):
    key = "openvino-cpu"
    formats = ("openvino-ir",)
    target = "cpu"

    @classmethod
    def available(cls) -> bool:
        return importlib.util.find_spec("openvino") is not None

    def __init__(self, path: Path, manifest: Manifest):
        import openvino

        self.compiled = compile_cpu(openvino.Core().read_model(path))

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, second = self.compiled(images).to_tuple()
        return maps.astype(np.float32, copy=False), second.astype(np.float32, copy=False)

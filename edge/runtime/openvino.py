"""OpenVINO's CPU runtime over the bundle's IR files, fp32, bf16 or INT8.

An IR is an XML description of the graph and a raw weights file beside it (<name>.bin, which
OpenVINO finds by the XML's name): OpenVINO parses the one and reads the other as bytes. Nothing is
unpickled and no code comes from the bundle; OpenVINO's own CPU plugin compiles the graph at load.
The files loaded are the verified private copies."""

import functools
import importlib.util
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from edge.runtime.backend import Backend
from protocols.bundle import BundleFile, Manifest, Precision

if TYPE_CHECKING:  # imported when used: a station without it still loads the other backends
    import openvino


# OpenVINO's name for the precision its CPU plugin computes in. An INT8 file keeps fp32 between its
# INT8 layers (as its parity was measured at export); an fp32 file stays fp32 on a CPU with bf16,
# where OpenVINO's default would be bf16.
INFERENCE_PRECISION = {"fp32": "f32", "int8": "f32", "bf16": "bf16"}


_CORE_LOCK = threading.Lock()


@functools.cache
def _create_core() -> "openvino.Core":
    import openvino

    return openvino.Core()


def shared_core() -> "openvino.Core":
    """The process's one OpenVINO Core, never released. Each Core loads its own CPU plugin, which
    installs its own signal stack (sigaltstack) on the thread that makes it and, when released,
    puts back on the releasing thread the one it found: two Cores made and released on one thread
    in the order they were made leave a freed stack installed, and the next signal Python handles
    on that thread kills the process with SIGSEGV (seen in the test suite: export, then a child
    process exiting)."""
    with _CORE_LOCK:  # two concurrent first calls would make a second Core and release one
        return _create_core()


def compile_cpu(model: "openvino.Model", precision: Precision) -> "openvino.CompiledModel":
    """An OpenVINO model compiled as the station runs a file of that precision."""
    return shared_core().compile_model(model, "CPU", {
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),  # the share of the cores torch was given
        "PERFORMANCE_HINT": "LATENCY",  # one stream: a batch at a time, as the daemon sends them
        "INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[precision],
    })


class OpenVinoCpuBackend(Backend):
    key = "openvino-cpu"
    formats = ("openvino-ir",)
    target = "cpu"

    @classmethod
    def available(cls) -> bool:
        return importlib.util.find_spec("openvino") is not None

    def __init__(self, path: Path, entry: BundleFile, manifest: Manifest):
        self.compiled = compile_cpu(shared_core().read_model(path), entry.precision)

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, second = self.compiled(images).to_tuple()
        return maps.astype(np.float32, copy=False), second.astype(np.float32, copy=False)

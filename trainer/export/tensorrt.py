"""The bundle's TensorRT file: the fused program compiled by torch-tensorrt (dynamo IR, fp16,
dynamic batch) and saved as an ExportedProgram with the manifest inside.

The only trainer module that imports torch_tensorrt, and only when called: it runs on a GPU
machine of the device class that will serve the engine (engines are specific to the GPU and
the TensorRT version). Written against torch-tensorrt 2.8 (JetPack 6) and 2.13 (workstations).
"""

import re
from pathlib import Path

import torch
from torch.export.passes import move_to_device_pass

from protocols.bundle import MANIFEST_NAME

class TensorRTUnavailable(RuntimeError):
    """torch-tensorrt cannot be imported on this machine."""


NOT_INSTALLED = (
    "torch-tensorrt is not installed: pip install '.[tensorrt]' on the GPU machine; "
    "TensorRT engines must be built on the target device class"
)
# Up to 2.9, fp16 is a builder flag on a weakly typed network: enabled_precisions={torch.half}.
# From 2.10 networks are strongly typed by default: enabled_precisions={torch.half} is rejected
# (2.10-2.12) or silently ignored (2.13, where the option is gone), and fp16 comes from
# torch-tensorrt's rule-based autocast instead.
AUTOCAST_SINCE = (2, 10)
# torch_tensorrt.save takes extra_files from 2.11; earlier versions swallow it in **kwargs.
SAVE_EXTRA_FILES_SINCE = (2, 11)


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def _fp16_settings(version: tuple[int, int]) -> dict[str, object]:
    if version >= AUTOCAST_SINCE:
        return {"enable_autocast": True, "autocast_low_precision_type": torch.float16}
    return {"enabled_precisions": {torch.half}}


def compile_tensorrt(
    program: torch.export.ExportedProgram,
    height: int,
    width: int,
    max_batch: int,
    out_path: Path,
    manifest_json: str,
) -> None:
    """Compile the fused program for uint8 NHWC batches of 1..max_batch and save it to out_path
    with `manifest_json` inside. Moves `program` to the GPU (in place)."""
    try:
        import torch_tensorrt
    except ImportError:
        raise TensorRTUnavailable(NOT_INSTALLED) from None
    version = _major_minor(torch_tensorrt.__version__)
    image = (height, width, 3)
    inputs = [torch_tensorrt.Input(
        min_shape=(1, *image),
        opt_shape=(max(1, max_batch // 2), *image),
        max_shape=(max_batch, *image),
        dtype=torch.uint8,
    )]
    # Bundles are exported on the CPU; TensorRT builds from weights on the GPU.
    compiled = torch_tensorrt.dynamo.compile(
        move_to_device_pass(program, "cuda"), arg_inputs=inputs, **_fp16_settings(version)
    )
    extra_files = {MANIFEST_NAME: manifest_json}
    if version >= SAVE_EXTRA_FILES_SINCE:
        torch_tensorrt.save(
            compiled, str(out_path), output_format="exported_program", arg_inputs=inputs, extra_files=extra_files
        )
    else:
        # What save(retrace=False) does in these versions, plus the extra files.
        torch.export.save(torch_tensorrt.dynamo.export(compiled), out_path, extra_files=extra_files)

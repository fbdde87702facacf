"""Loading torch.export archives (`.pt2`, and torch-tensorrt's `.ep`) without Python's unpickler.

What `torch.export.load` deserialises (torch 2.8 to 2.13, torch/export/pt2_archive/_package.py):
- the graph: `models/<name>.json`, JSON; it names operators, it holds no code;
- weights and tensor constants: raw bytes described by JSON configs, or, for entries flagged
  `use_pickle`, `torch.load(..., weights_only=False)`: Python's full unpickler;
- the example inputs (`data/sample_inputs/*.pt`): `torch.load(weights_only=True)`, and if that
  fails, again with `weights_only=False`;
- `opaque_obj_*` constants: `pickle.loads`; `custom_obj_*` constants: TorchScript's unpickler,
  which builds only C++-registered classes (a TensorRT engine is one);
- any `data/aotinductor/` entries: a compiled shared library, loaded and run.

So here: archives with `opaque_obj_*` or AOTInductor entries are refused (our exports have none),
`custom_obj_*` only where the format needs them (TensorRT), and every `torch.load` during the load
is forced to `weights_only=True` (torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD, read at each call),
which also closes the fallback above. A tensor flagged `use_pickle` then loads through the
restricted unpickler or not at all."""

import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

_NATIVE_CODE = "data/aotinductor/"
_PICKLED_OBJECT = "data/constants/opaque_obj_"
_SCRIPT_OBJECT = "data/constants/custom_obj_"
_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


class ArchiveRefused(ValueError):
    """An archive with content the station will not deserialise; the message names the entry."""


def check_program_archive(path: Path, allow_script_objects: bool) -> None:
    """Refuse an archive whose entries would run native code or Python's unpickler when loaded."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise ArchiveRefused(f"not a torch.export archive ({err})") from None
    for name in names:
        inner = name.split("/", 1)[-1]  # entries sit under the archive's own top-level folder
        if inner.startswith(_NATIVE_CODE):
            raise ArchiveRefused(f"{name}: compiled native code inside a torch.export program")
        if inner.startswith(_PICKLED_OBJECT):
            raise ArchiveRefused(f"{name}: a Python-pickled object (would be unpickled)")
        if inner.startswith(_SCRIPT_OBJECT) and not allow_script_objects:
            raise ArchiveRefused(f"{name}: a TorchScript object, which this format never holds")


@contextmanager
def weights_only_unpickling() -> Iterator[None]:
    """Every torch.load inside runs the restricted unpickler, whatever its caller asked for.
    The station's own threads call no torch.load meanwhile (they only run inference)."""
    previous = os.environ.get(_FORCE_WEIGHTS_ONLY)
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[_FORCE_WEIGHTS_ONLY]
        else:
            os.environ[_FORCE_WEIGHTS_ONLY] = previous


def load_program(path: Path, allow_script_objects: bool = False) -> torch.export.ExportedProgram:
    check_program_archive(path, allow_script_objects)
    with weights_only_unpickling():
        return torch.export.load(path)

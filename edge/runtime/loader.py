"""Load a verified bundle into a ready backend: the named one, or with `auto` the fastest one
this machine can run (each candidate is warmed up and timed on the bundle's own input size)."""

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.runtime.aoti import AotiCpuBackend
from edge.runtime.backend import Backend, BackendUnavailable
from edge.runtime.bundle import BundleError, VerifiedBundle, verify_bundle
from edge.runtime.exported import ExportedCpuBackend, ExportedCudaBackend
from edge.runtime.tensorrt import TensorRTBackend

BACKENDS: tuple[type[Backend], ...] = (TensorRTBackend, ExportedCudaBackend, AotiCpuBackend, ExportedCpuBackend)
BACKEND_KEYS = ("auto", *(b.key for b in BACKENDS))


@dataclass
class LoadedModel:
    bundle: VerifiedBundle
    backend: Backend
    images_per_second: float  # measured during warm-up at max batch

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.backend.infer(images)


def _candidates(bundle: VerifiedBundle, choice: str) -> list[tuple[type[Backend], Path]]:
    found = []
    for backend in BACKENDS:
        if choice not in ("auto", backend.key):
            continue
        for entry in bundle.manifest.files:
            if entry.format in backend.formats and backend.available():
                found.append((backend, bundle.root / entry.path))
                break
    return found


def warm_up(backend: Backend, bundle: VerifiedBundle, repeats: int = 2) -> float:
    """Run batch 1 and the largest batch; return images/s at the largest batch."""
    spec = bundle.manifest.input
    rng = np.random.default_rng(0)
    backend.infer(rng.integers(0, 256, (1, spec.height, spec.width, 3), dtype=np.uint8))
    batch = rng.integers(0, 256, (spec.max_batch, spec.height, spec.width, 3), dtype=np.uint8)
    backend.infer(batch)
    start = time.perf_counter()
    for _ in range(repeats):
        backend.infer(batch)
    return repeats * spec.max_batch / (time.perf_counter() - start)


def load_model(root: Path, choice: str = "auto") -> LoadedModel:
    if choice not in BACKEND_KEYS:
        raise BundleError(f"unknown backend {choice!r}; choose one of {', '.join(BACKEND_KEYS)}")
    bundle = verify_bundle(root)
    candidates = _candidates(bundle, choice)
    if not candidates:
        formats = sorted({f.format for f in bundle.manifest.files})
        raise BundleError(f"{root}: no backend {'' if choice == 'auto' else choice + ' '}on this machine "
                          f"can run the bundle's files ({', '.join(formats)})")
    loaded = []
    for backend_type, path in candidates:
        try:
            backend = backend_type(path, bundle.manifest)
        except BackendUnavailable:
            continue
        except Exception as err:  # a file that verifies but will not load is still a bad bundle
            raise BundleError(f"{path}: cannot be loaded by {backend_type.key}: {err}") from err
        loaded.append(LoadedModel(bundle, backend, warm_up(backend, bundle)))
    if not loaded:
        raise BundleError(f"{root}: none of the candidate backends could start here")
    return max(loaded, key=lambda m: m.images_per_second)

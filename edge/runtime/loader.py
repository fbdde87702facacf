"""Load one head of a verified bundle into a ready backend: the named one, or with `auto` the
fastest one this machine can run. Each candidate is warmed up and timed at every batch size up to
the bundle's maximum, on the bundle's own input size; the daemon batches at the fastest size."""

import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import numpy as np

from edge.runtime.aoti import AotiCpuBackend
from edge.runtime.backend import Backend, BackendUnavailable
from edge.runtime.bundle import BundleError, VerifiedBundle, verify_bundle
from edge.runtime.cpu_features import station_cpu_features
from edge.runtime.exported import ExportedCpuBackend, ExportedCudaBackend
from edge.runtime.openvino import OpenVinoCpuBackend
from edge.runtime.tensorrt import TensorRTBackend
from protocols.bundle import BundleFile, HeadName, HeadSpec, RadarSpec
from protocols.signing import SignatureError, load_trusted_keys

BACKENDS: tuple[type[Backend], ...] = (TensorRTBackend, ExportedCudaBackend, AotiCpuBackend, OpenVinoCpuBackend,
                                       ExportedCpuBackend)
BACKEND_KEYS = ("auto", *(b.key for b in BACKENDS))
HEAD_CHOICES = ("auto", *get_args(HeadName))


# Each batch size is timed for at least this long at load: long enough to rank them, short enough
# for a hot swap.
MIN_TIMING_S = 0.5


@dataclass
class LoadedModel:
    bundle: VerifiedBundle
    head: HeadSpec  # the head served: its thresholds decide
    file: BundleFile  # the head's file the backend runs
    backend: Backend
    batch_rates: dict[int, float]  # images/s per batch size, measured at load
    passed_over: list[str]  # the head's files this CPU cannot run, and why

    @property
    def best_batch(self) -> int:
        """The batch size with the highest throughput here: on a CPU, past a point, a bigger batch
        only spills the caches."""
        return max(self.batch_rates, key=self.batch_rates.__getitem__)

    @property
    def images_per_second(self) -> float:
        return self.batch_rates[self.best_batch]

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(anomaly_map [B, H, W], score [B]) whatever the head: a RADAR graph's second output is
        its features, which the head's one-class model scores here, outside the graph."""
        maps, second = self.backend.infer(images)
        if isinstance(self.head.method, RadarSpec):
            return maps, self.head.method.one_class.score(second).astype(np.float32)
        return maps, second


def select_head(bundle: VerifiedBundle, choice: str) -> HeadSpec:
    """The head `choice` names, or with `auto` the bundle's recommended head."""
    manifest = bundle.manifest
    head = manifest.head(manifest.recommended_head if choice == "auto" else choice)
    if head is None:
        raise BundleError(f"{bundle.root}: the bundle has no {choice} head (its heads: "
                          f"{', '.join(manifest.head_names)})")
    return head


def _candidates(head: HeadSpec, choice: str) -> tuple[list[tuple[type[Backend], BundleFile]], list[str]]:
    """Every (backend, file) pair this machine can run, and the files passed over because the CPU
    lacks a feature they were compiled for."""
    found, passed_over = [], []
    cpu = station_cpu_features()
    for backend in BACKENDS:
        if choice not in ("auto", backend.key) or not backend.available():
            continue
        for entry in head.files:
            if entry.format not in backend.formats:
                continue
            if missing := sorted(set(entry.cpu_features) - cpu):
                passed_over.append(f"{entry.path} needs CPU features this station lacks: {', '.join(missing)}")
            else:
                found.append((backend, entry))
    return found, passed_over


def batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to max_batch, and max_batch itself."""
    sizes = [1 << k for k in range(max_batch.bit_length()) if 1 << k < max_batch]
    return [*sizes, max_batch]


def warm_up(backend: Backend, bundle: VerifiedBundle) -> dict[int, float]:
    """Run every batch size once, then time it; images/s per batch size."""
    spec = bundle.manifest.input
    images = np.random.default_rng(0).integers(0, 256, (spec.max_batch, spec.height, spec.width, 3), dtype=np.uint8)
    rates = {}
    for size in batch_sizes(spec.max_batch):
        batch = images[:size]
        backend.infer(batch)
        calls, start = 0, time.perf_counter()
        while calls < 2 or time.perf_counter() - start < MIN_TIMING_S:
            backend.infer(batch)
            calls += 1
        rates[size] = calls * size / (time.perf_counter() - start)
    return rates


def load_model(root: Path, choice: str = "auto", trusted_keys_dir: Path | None = None,
               head: str = "auto") -> LoadedModel:
    """Verify the bundle, load `head` (auto: the bundle's recommended head) and warm it up. With
    `trusted_keys_dir`, only a bundle signed by one of its keys (read at every load, so a key can
    be added or withdrawn with a reload). Any failure is a BundleError naming the bundle and the
    cause."""
    if choice not in BACKEND_KEYS:
        raise BundleError(f"unknown backend {choice!r}; choose one of {', '.join(BACKEND_KEYS)}")
    if head not in HEAD_CHOICES:
        raise BundleError(f"unknown head {head!r}; choose one of {', '.join(HEAD_CHOICES)}")
    try:
        trusted_keys = load_trusted_keys(trusted_keys_dir) if trusted_keys_dir is not None else None
    except SignatureError as err:
        raise BundleError(str(err)) from None
    # The backends read the verified copies, which live only until the model is in memory.
    with tempfile.TemporaryDirectory(prefix="edge-bundle-") as copy_dir:
        bundle = verify_bundle(root, trusted_keys, Path(copy_dir))
        return _load_verified(bundle, select_head(bundle, head), choice)


def _load_verified(bundle: VerifiedBundle, head: HeadSpec, choice: str) -> LoadedModel:
    root = bundle.root
    candidates, passed_over = _candidates(head, choice)
    if not candidates:
        formats = sorted({f.format for f in head.files})
        raise BundleError(f"{root}: no backend {'' if choice == 'auto' else choice + ' '}on this machine "
                          f"can run the {head.name} head's files ({', '.join(formats)})"
                          + "".join(f"; {reason}" for reason in passed_over))
    fastest = None  # only the fastest so far stays in memory: each backend holds its own weights
    for backend_type, entry in candidates:
        path = root / entry.path
        try:
            backend = backend_type(bundle.copies[entry.path], entry, bundle.manifest)
        except BackendUnavailable:
            continue
        except Exception as err:  # a file that verifies but will not load is still a bad bundle
            raise BundleError(f"{path}: cannot be loaded by {backend_type.key}: {_first_line(err)}") from err
        try:
            rates = warm_up(backend, bundle)
        except Exception as err:
            raise BundleError(f"{path}: fails its warm-up on {backend_type.key}: "
                              f"{type(err).__name__}: {_first_line(err)}") from err
        model = LoadedModel(bundle, head, entry, backend, rates, passed_over)
        if fastest is None or model.images_per_second > fastest.images_per_second:
            fastest = model
        del backend, model
    if fastest is None:
        raise BundleError(f"{root}: none of the candidate backends could start here")
    return fastest


def _first_line(err: Exception) -> str:
    """Torch's errors run to many lines; a refusal is reported in one."""
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


class BackgroundLoad:
    """`load_model` on a thread of its own that ends when it returns: the caller stays free (the
    daemon's main thread keeps answering the watchdog during a hot swap), and no OpenMP pool is
    left behind. OpenMP keeps a pool of worker threads per thread that ran parallel work, for as
    long as that thread lives, and libgomp stops spin-waiting once its pools hold more threads
    than there are CPUs: a warm-up on a long-lived thread would leave such a pool and slow every
    later batch of the inference thread (≈15–20 % on 2 cores, measured)."""

    def __init__(self, root: Path, choice: str = "auto", trusted_keys_dir: Path | None = None,
                 head: str = "auto") -> None:
        self._done = threading.Event()
        self._model: LoadedModel | None = None
        self._error: BaseException | None = None
        threading.Thread(target=self._load, args=(root, choice, trusted_keys_dir, head), name="model-load",
                         daemon=True).start()

    def _load(self, root: Path, choice: str, trusted_keys_dir: Path | None, head: str) -> None:
        try:
            self._model = load_model(root, choice, trusted_keys_dir, head)
        except BaseException as err:  # handed to the caller of result()
            self._error = err
        finally:
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self) -> LoadedModel:
        """Wait for the load; raise what it raised."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._model

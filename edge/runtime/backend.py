"""The one interface every inference backend implements: a bundle file in, `infer` out."""

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np

from protocols.bundle import BundleFile, Manifest


class BackendUnavailable(RuntimeError):
    """This machine cannot run the backend (no GPU, library not installed, ...)."""


class Backend(ABC):
    key: ClassVar[str]      # the name a setting chooses it by, e.g. "exported-cpu"
    formats: ClassVar[tuple[str, ...]]  # BundleFile.format values it can load
    target: ClassVar[str]   # BundleFile.target it loads

    @classmethod
    @abstractmethod
    def available(cls) -> bool:
        """Whether this machine can run the backend at all (cheap; no model loaded)."""

    @abstractmethod
    def __init__(self, path: Path, entry: BundleFile, manifest: Manifest):
        """Load the file `entry` describes from `path`, its verified private copy
        (edge/runtime/bundle.py), never the bundle's own. Raise BackendUnavailable if this machine
        can't."""

    @abstractmethod
    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [B, H, W, 3] RGB at the manifest's input size (1 <= B <= max_batch) →
        (anomaly_map float32 [B, H, W], the head's second output: score float32 [B] for the
        norm-guided head, features float32 [B, 2] for RADAR, scored by LoadedModel)."""

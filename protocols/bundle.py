"""The model-bundle manifest: what travels from the trainer to a station.

A bundle is a directory: `manifest.json` plus model files. Every file is listed with its format,
target and sha256; a station refuses a bundle whose files do not match. Thresholds live here,
outside the compiled graphs, so an operator can change them without recompiling.
"""

import hashlib
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

BUNDLE_VERSION = 2
# 2: thresholds state their expected false-reject rate. Version 1 bundles still load.
SUPPORTED_BUNDLE_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
# sha256 of manifest.json's bytes: the manifest cannot list its own hash, so it sits beside it.
MANIFEST_DIGEST_NAME = "manifest.sha256"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    dtype: Literal["uint8"] = "uint8"
    layout: Literal["NHWC"] = "NHWC"
    color: Literal["RGB"] = "RGB"
    max_batch: int = Field(gt=0, description="largest batch every file in the bundle accepts")


class OutputSpec(_Strict):
    anomaly_map: str = "float32 [B, H, W] in [0, 1]"
    score: str = "float32 [B]: mean of the top-K anomaly-map pixels"


class MethodSpec(_Strict):
    name: Literal["diffusionad-norm-guided-one-step"] = "diffusionad-norm-guided-one-step"
    profile: str
    num_timesteps: int
    beta_schedule: Literal["linear"] = "linear"
    beta_start: float
    beta_end: float
    t_s: int
    t_b: int
    guidance_w: float
    top_k: int
    noise_seed: int


class ThresholdSpec(_Strict):
    image: float = Field(description="fail iff score >= image")
    pixel: float = Field(description="a pixel is defective iff anomaly_map >= pixel")
    policy: Literal["false_reject_rate", "max_f1"]
    target_false_reject_rate: float | None = None
    calibration_images: int = Field(ge=0, description="good images the thresholds rest on (none of them chose "
                                    "the model)")
    estimator: Literal["conformal", "logit-normal"] | None = Field(
        None, description="conformal: a finite-sample quantile of the good scores; logit-normal: a fit, when the "
                          "images are too few to observe the target rate")
    expected_false_reject_rate: float | None = Field(None, description="on good parts not yet seen")
    false_reject_rate_upper: float | None = Field(None, description="the rate stays below this with 90 % confidence")


class Provenance(_Strict):
    trainer_version: str
    torch_version: str
    data_fingerprint: str = Field(description="sha256 over the training images' paths and bytes")
    created: datetime


class BundleFile(_Strict):
    path: str = Field(description="relative to the bundle directory")
    format: Literal["torch.export", "aoti-package", "torch-tensorrt"]
    target: Literal["cpu", "cuda", "tensorrt"]
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ModelIdentity(_Strict):
    name: str
    version: str


class Manifest(_Strict):
    version: Literal[1, 2] = BUNDLE_VERSION
    model: ModelIdentity
    input: InputSpec
    outputs: OutputSpec = OutputSpec()
    method: MethodSpec
    thresholds: ThresholdSpec
    metrics: dict[str, float | None] = Field(default_factory=dict, description="validation (and eval) figures")
    provenance: Provenance
    files: list[BundleFile] = Field(min_length=1)


def sha256_file(path: Path) -> str:
    """The digest recorded for every bundle file (hex sha256 of its bytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()

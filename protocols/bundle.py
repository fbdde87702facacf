"""The model-bundle manifest: what travels from the trainer to a station.

A bundle is a directory: `manifest.json` plus model files. It holds one or more heads (graphs over
the same input), each with its files, constants, thresholds, metrics and outputs; a station serves
one. Every file is listed with its format, target and sha256; a station refuses a bundle whose
files do not match. Thresholds live here, outside the compiled graphs, so an operator can change
them without recompiling.
"""

import hashlib
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocols.one_class import KnnNormalModel

BUNDLE_VERSION = 3
# 2: thresholds state their expected false-reject rate. 3: heads (norm-guided, RADAR). Versions 1
# and 2 still load, read as a bundle with the norm-guided head only.
SUPPORTED_BUNDLE_VERSIONS = (1, 2, 3)
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


HeadName = Literal["norm-guided", "radar"]


class OutputSpec(_Strict):
    """The norm-guided graph's outputs."""
    anomaly_map: str = "float32 [B, H, W] in [0, 1]"
    score: str = "float32 [B]: mean of the top-K anomaly-map pixels"


class RadarOutputSpec(_Strict):
    """The RADAR graph's outputs: the image score is computed outside the graph, from the features."""
    anomaly_map: str = "float32 [B, H, W] in [0, 1)"
    features: str = ("float32 [B, 2]: L2 norm of the edge response and its largest window L2 norm; "
                     "score = the head's one_class model applied to them, in [0, 1)")


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


class RadarSpec(_Strict):
    name: Literal["radar"] = "radar"
    t: int = Field(gt=0, description="t_radar, the single noise scale")
    discrepancy: Literal["residual", "predicted"]
    window: int = Field(gt=0, description="side of the feature windows, pixels at model resolution")
    map_scale: float = Field(gt=0, description="edge response that maps to 0.5 in the anomaly map")
    blur_ksize: int = Field(gt=0)
    sobel_ksize: int = Field(gt=0)
    one_class: KnnNormalModel = Field(description="the image decision over the graph's features")


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


class HeadSpec(_Strict):
    name: HeadName
    files: list[BundleFile] = Field(min_length=1)
    method: MethodSpec | RadarSpec
    thresholds: ThresholdSpec
    metrics: dict[str, float | None] = Field(default_factory=dict, description="validation (and eval) figures")
    outputs: OutputSpec | RadarOutputSpec

    @model_validator(mode="after")
    def _consistent(self) -> "HeadSpec":
        radar = self.name == "radar"
        if isinstance(self.method, RadarSpec) != radar or isinstance(self.outputs, RadarOutputSpec) != radar:
            raise ValueError(f"head {self.name!r}: method and outputs must be those of the {self.name} head")
        return self


class Manifest(_Strict):
    version: Literal[3] = Field(BUNDLE_VERSION, description="versions 1 and 2 are read as version 3 with one "
                                "norm-guided head")
    model: ModelIdentity
    input: InputSpec
    heads: list[HeadSpec] = Field(min_length=1)
    recommended_head: HeadName = Field(description="the head with the better validation selection figure")
    provenance: Provenance

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, data: Any) -> Any:
        """A version 1 or 2 manifest: its one graph is the norm-guided head."""
        if not (isinstance(data, dict) and data.get("version") in (1, 2)):
            return data
        old = dict(data)
        head = {key: old.pop(key) for key in ("files", "method", "thresholds", "metrics", "outputs") if key in old}
        head.setdefault("outputs", OutputSpec().model_dump())
        return {**old, "version": BUNDLE_VERSION, "heads": [{"name": "norm-guided", **head}],
                "recommended_head": "norm-guided"}

    @model_validator(mode="after")
    def _heads(self) -> "Manifest":
        names = [h.name for h in self.heads]
        if len(set(names)) != len(names):
            raise ValueError(f"heads listed twice: {names}")
        if self.recommended_head not in names:
            raise ValueError(f"recommended_head {self.recommended_head!r} is not one of the heads ({', '.join(names)})")
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise ValueError(f"a file belongs to two heads: {paths}")
        return self

    @property
    def head_names(self) -> list[str]:
        return [h.name for h in self.heads]

    @property
    def files(self) -> list[BundleFile]:
        """Every file of every head."""
        return [f for h in self.heads for f in h.files]

    def head(self, name: str) -> HeadSpec | None:
        return next((h for h in self.heads if h.name == name), None)


def sha256_file(path: Path) -> str:
    """The digest recorded for every bundle file (hex sha256 of its bytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()

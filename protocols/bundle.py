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

BUNDLE_VERSION = 6
# 2: thresholds state their expected false-reject rate. 3: heads (norm-guided, RADAR). 4: files
# state their precision, the CPU features they need and, below fp32, their parity with it. 5:
# thresholds state what set them and their detection ceiling. 6: the input states its tiling. Older
# versions still load: 1 and 2 as a bundle with the norm-guided head only, every file fp32 with no
# stated CPU needs.
SUPPORTED_BUNDLE_VERSIONS = (1, 2, 3, 4, 5, 6)
MANIFEST_NAME = "manifest.json"
# sha256 of manifest.json's bytes: the manifest cannot list its own hash, so it sits beside it.
MANIFEST_DIGEST_NAME = "manifest.sha256"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TilingSpec(_Strict):
    """How the graphs cut a frame for the networks; the station sends whole frames either way."""
    tile: int = Field(gt=0, description="side of the networks' input, px")
    per_side: int = Field(ge=2, description="tiles a side: per_side² tiles a frame")
    stride: int = Field(gt=0, description="tile origins are multiples of it; neighbours overlap by tile - stride")


class InputSpec(_Strict):
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    dtype: Literal["uint8"] = "uint8"
    layout: Literal["NHWC"] = "NHWC"
    color: Literal["RGB"] = "RGB"
    max_batch: int = Field(gt=0, description="largest batch every file in the bundle accepts")
    tiling: TilingSpec | None = Field(None, description="frames cut into overlapping tiles inside the graphs, "
                                      "their maps stitched (mean over overlaps); none: one tile, the frame")

    @model_validator(mode="after")
    def _tiles_cover_the_frame(self) -> "InputSpec":
        t = self.tiling
        if t is not None and (self.height, self.width) != ((covered := t.tile + (t.per_side - 1) * t.stride),) * 2:
            raise ValueError(f"tiling covers {covered} px a side ({t.per_side} tiles of {t.tile} px at stride "
                             f"{t.stride}), the input is {self.height} × {self.width}")
        return self


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
    limited_by: Literal["false_reject_rate", "synthetic_defects"] | None = Field(
        None, description="synthetic_defects: the good images were too few to observe the target rate, and the "
                          "threshold extrapolated from them would have passed more than 10 % of synthetic defects; "
                          "the thresholds are the detection ceiling and the expected rate is the fit's rate there")
    detection_ceiling_image: float | None = Field(None, description="the highest image threshold that fails 90 % "
                                                  "of synthetic defects made on the calibration images")
    detection_ceiling_pixel: float | None = Field(None, description="the same for the highest map value inside "
                                                  "each synthetic defect")


class Provenance(_Strict):
    trainer_version: str
    torch_version: str
    data_fingerprint: str = Field(description="sha256 over the training images' paths and bytes")
    created: datetime


Precision = Literal["fp32", "bf16", "int8"]


class ParitySpec(_Strict):
    """A reduced-precision file measured against the head's fp32 program on the run's held-out
    images (the selection split's good images and synthetic defects, and the calibration images);
    never the test set. Export ships a file only within the limits stated here."""
    images: int = Field(gt=0)
    verdict_agreement: float = Field(ge=0, le=1, description="share of images with the fp32 verdict at the head's "
                                     "image threshold")
    max_abs_score_delta: float = Field(ge=0, description="largest |score - fp32 score| (RADAR: the one-class score)")
    image_auroc_delta: float = Field(description="image AUROC minus fp32's, percentage points, good vs synthetic")
    min_verdict_agreement: float = Field(description="the export's limit: a file agreeing less is not shipped")
    max_image_auroc_drop: float = Field(description="the export's limit, percentage points")


class BundleFile(_Strict):
    path: str = Field(pattern=r"^[^/\\]+$", description="a file name in the bundle directory")
    format: Literal["torch.export", "aoti-package", "torch-tensorrt", "openvino-ir", "openvino-weights"]
    target: Literal["cpu", "cuda", "tensorrt"]
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    precision: Precision = "fp32"
    cpu_features: list[str] = Field(default_factory=list, description="instruction-set extensions the file needs, "
                                    "as /proc/cpuinfo names them (e.g. avx2, avx512f); a station whose CPU lacks one "
                                    "never loads the file")
    parity: ParitySpec | None = Field(None, description="required below fp32")

    @model_validator(mode="after")
    def _parity_below_fp32(self) -> "BundleFile":
        if (self.precision != "fp32") != (self.parity is not None):
            raise ValueError(f"{self.path}: a {self.precision} file {'needs' if self.parity is None else 'has no'} "
                             "parity figures")
        return self


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

    @property
    def score_from_map(self) -> bool:
        """Whether the image score is computed from the anomaly map (norm-guided: the mean of its
        highest pixels), so both are on one scale; RADAR's comes from the one-class model."""
        return isinstance(self.method, MethodSpec)


class Manifest(_Strict):
    version: Literal[6] = Field(BUNDLE_VERSION, description="versions 1 to 5 are read as version 6; 1 and 2 with "
                                "one norm-guided head")
    model: ModelIdentity
    input: InputSpec
    heads: list[HeadSpec] = Field(min_length=1)
    recommended_head: HeadName = Field(description="the head with the better validation selection figure")
    provenance: Provenance

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, data: Any) -> Any:
        """An older manifest: versions 3 to 5 lack only what has defaults; in versions 1 and 2 the
        one graph is the norm-guided head."""
        if isinstance(data, dict) and data.get("version") in (3, 4, 5):
            return {**data, "version": BUNDLE_VERSION}
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

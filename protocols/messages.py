"""Wire contracts, version 1: camera frames in over ZeroMQ, verdicts/status/errors out over MQTT.

Frames: a two-part ZeroMQ message [header (UTF-8 JSON FrameHeader), payload (pixels or file)].
MQTT topics under a prefix (default `inspection/<station_id>`):
  <prefix>/<camera_id>/result  Result, QoS 1, one per accepted frame
  <prefix>/status              Status, QoS 1, retained; the Last Will says `offline`
  <prefix>/error               ErrorReport, QoS 1: a frame rejected or not inspected, or a station problem
Every accepted frame gets exactly one answer: a Result or an ErrorReport naming the frame. Delivery
is at least once: subscribers de-duplicate on the station-assigned `result_id` / `error_id`.

Versioning: `v` changes only when a message changes incompatibly. Within a version, the station's
messages may gain optional fields (`model.head` came this way), so readers of them ignore fields
they do not know; frame headers, written by cameras for the station, stay strict so a misspelt
field is an error, not silently dropped.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from protocols.bundle import HeadName

WIRE_VERSION = 1
# A camera id is one MQTT topic level: no separators or wildcards.
CAMERA_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def encode(self) -> bytes:
        return self.model_dump_json(exclude_none=False).encode()


class _StationMessage(_Message):
    """What the station publishes: a reader keeps working when a later station adds a field."""
    model_config = ConfigDict(extra="ignore", frozen=True)


class FrameHeader(_Message):
    v: Literal[1] = WIRE_VERSION
    camera_id: str = Field(pattern=CAMERA_ID_PATTERN)
    frame_id: str = Field(min_length=1, max_length=128)
    ts_ns: int = Field(ge=0, description="capture time, ns since the Unix epoch")
    encoding: Literal["raw", "jpeg", "png"]
    width: int = Field(gt=0, le=16384)
    height: int = Field(gt=0, le=16384)
    pixel_format: Literal["bgr8", "rgb8", "mono8"] | None = Field(None, description="raw frames only")
    part_id: str | None = Field(None, max_length=128)
    meta: dict | None = Field(None, description="echoed in the result; size limited by the station")

    @model_validator(mode="after")
    def _pixel_format_iff_raw(self) -> "FrameHeader":
        if (self.encoding == "raw") != (self.pixel_format is not None):
            raise ValueError("pixel_format is required for raw frames and only for them")
        return self

    @property
    def raw_size(self) -> int:
        """Bytes of a tightly packed raw payload."""
        channels = 1 if self.pixel_format == "mono8" else 3
        return self.width * self.height * channels


class FrameError(ValueError):
    """A frame that cannot be used; `reason` is what goes on the error topic."""


def decode_header(data: bytes) -> FrameHeader:
    try:
        return FrameHeader.model_validate_json(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "header"
        if first["type"] == "json_invalid":
            raise FrameError(f"header is not valid JSON: {first['msg']}") from None
        raise FrameError(f"header {where}: {first['msg']}") from None


class ModelRef(_StationMessage):
    name: str
    version: str
    sha256: str = Field(description="sha256 of the bundle's manifest")
    head: HeadName | None = Field(None, description="the bundle head that produced the answer")


class LatencyMs(_StationMessage):
    queue: float = Field(description="received → inference batch formed")
    decode: float
    infer: float = Field(description="the frame's inference batch")
    post: float = Field(description="regions and mask encoding")
    total: float = Field(description="received → handed to the outbox")


class Region(_StationMessage):
    bbox: tuple[int, int, int, int] = Field(description="x, y, w, h in frame pixels")
    area_px: int
    max_score: float


Verdict = Literal["pass", "fail"]
# Why a verdict was forced to `fail`: the model's output could not be trusted (fail-safe).
ResultFlag = Literal["non_finite_score", "non_finite_map"]


class Result(_StationMessage):
    v: Literal[1] = WIRE_VERSION
    result_id: str = Field(description="assigned by the station: unique, sorts by time; the de-duplication key")
    camera_id: str
    frame_id: str
    part_id: str | None
    verdict: Verdict
    score: float | None = Field(description="null when the model's score was not finite (the verdict is then fail)")
    threshold: float
    flags: list[ResultFlag] = Field(default_factory=list, description="why a verdict was forced to fail")
    ts_capture_ns: int
    ts_result_ns: int
    latency_ms: LatencyMs
    model: ModelRef
    regions: list[Region]
    mask: str | None = Field(description="base64 PNG of the binary mask at frame resolution")
    meta: dict | None = None


StationState = Literal["online", "degraded", "draining", "faulted", "offline"]


class Status(_StationMessage):
    v: Literal[1] = WIRE_VERSION
    state: StationState = Field(description="online: inspecting; degraded: running, but frames may get errors "
                                "(reason says why); draining: stopping, answering what it accepted; faulted: "
                                "a worker died, the station drains and restarts; offline: not running")
    reason: str | None = Field(None, description="why the state is not online")
    station_id: str
    model: ModelRef | None = None
    backend: str | None = None
    ts_ns: int


# rejected: the frame was unusable and never accepted; not_inspected: accepted, but no verdict can
# come (a PLC treats the part as a reject); station: about the station, not one frame.
ErrorKind = Literal["rejected", "not_inspected", "station"]


class ErrorReport(_StationMessage):
    v: Literal[1] = WIRE_VERSION
    error_id: str = Field(description="assigned by the station: unique, sorts by time; the de-duplication key")
    kind: ErrorKind
    reason: str
    camera_id: str | None = None
    frame_id: str | None = None
    part_id: str | None = None
    model: ModelRef | None = Field(None, description="the model that failed, for not_inspected frames")
    ts_ns: int


def result_topic(prefix: str, camera_id: str) -> str:
    return f"{prefix}/{camera_id}/result"


def status_topic(prefix: str) -> str:
    return f"{prefix}/status"


def error_topic(prefix: str) -> str:
    return f"{prefix}/error"

"""Daemon settings: a TOML file (`edge serve --config F`) overridden by `EDGE_*` environment
variables nested with `__` (e.g. `EDGE_MQTT__PORT=1884`). Every setting has a type, a default and
a description; the README's configuration table is checked against this model."""

from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CurveSettings(_Section):
    secret_key_file: Path = Field(description="the station's secret certificate (`edge keys`; ZeroMQ's format)")
    authorized_keys_dir: Path = Field(description="public certificates of the cameras allowed to send frames")


class ZmqSettings(_Section):
    bind: str = Field("tcp://127.0.0.1:5555", description="PULL endpoint cameras connect to (pull mode)")
    mode: Literal["pull", "sub"] = Field("pull", description="pull: cameras push to us (never drops); sub: we "
                                         "subscribe (lossy: ZeroMQ drops at the high-water mark, counted as gaps)")
    connect: list[str] = Field(default_factory=list, description="camera PUB endpoints (sub mode, fan-out)")
    rcvhwm: int = Field(4, gt=0, description="receive high-water mark (messages buffered in ZeroMQ per camera)")
    max_payload_bytes: int = Field(64 * 1024 * 1024, gt=0, description="ZeroMQ MAXMSGSIZE: a larger message part "
                                   "is refused by ZeroMQ before it is allocated (the camera's connection is reset)")
    max_header_bytes: int = Field(64 * 1024, gt=0, description="larger headers are rejected unparsed")
    max_meta_bytes: int = Field(16 * 1024, ge=0, description="larger `meta` (as compact JSON) is rejected")
    max_pixels: int = Field(64_000_000, gt=0, description="frames declaring more pixels are rejected before "
                            "decoding (JPEG/PNG: the size in the file's own header)")
    curve: CurveSettings | None = Field(None, description="ZeroMQ CURVE: only cameras with an authorised "
                                        "certificate reach the decoder (section present = on)")


class TlsSettings(_Section):
    ca_certs: Path | None = Field(None, description="CA bundle to verify the broker (any tls key turns TLS on)")
    certfile: Path | None = Field(None, description="client certificate (mutual TLS)")
    keyfile: Path | None = Field(None, description="client key (mutual TLS)")


class MqttSettings(_Section):
    host: str = Field("127.0.0.1", description="broker host")
    port: int = Field(1883, gt=0, lt=65536, description="broker port")
    protocol: Literal["5", "3.1.1"] = Field("5", description="MQTT protocol version")
    client_id: str | None = Field(None, description="default: edge-<station_id>")
    username: str | None = Field(None, description="broker user name")
    password: str | None = Field(None, description="broker password (prefer password_file)")
    password_file: Path | None = Field(None, description="file holding the broker password, e.g. a systemd "
                                       "credential (`%d/mqtt-password`)")
    tls: TlsSettings | None = Field(None, description="enable TLS (section present = on)")
    keepalive_s: int = Field(30, gt=0, description="MQTT keep-alive")
    topic_prefix: str | None = Field(None, description="default: inspection/<station_id>")
    reconnect_min_s: float = Field(0.5, gt=0, description="first reconnect delay (doubles up to max)")
    reconnect_max_s: float = Field(30.0, gt=0, description="longest reconnect delay")
    max_inflight: int = Field(64, gt=0, description="QoS 1 messages awaiting acknowledgement")


# The keys of edge.runtime.loader.BACKENDS (a test keeps them equal; torch is not imported here).
BackendChoice = Literal["auto", "tensorrt", "exported-cuda", "aoti-cpu", "openvino-cpu", "exported-cpu"]


class InferenceSettings(_Section):
    backend: BackendChoice = Field("auto", description="auto (the fastest this machine runs), tensorrt, "
                                   "exported-cuda, aoti-cpu, openvino-cpu or exported-cpu")
    head: Literal["auto", "norm-guided", "radar"] = Field(
        "auto", description="the bundle's head to serve; auto: the one it recommends (better on validation)")
    max_batch: int | None = Field(None, gt=0, description="frames per inference batch (at most the bundle's "
                                  "max); default: the fastest size measured at load")
    max_wait_ms: float = Field(5.0, ge=0, description="longest wait to fill a batch")
    backpressure: Literal["block", "latest"] = Field(
        "block", description="block: never drop (pressure reaches the sender); latest: drop oldest queued")
    queue_size: int = Field(32, gt=0, description="decoded frames waiting for inference")
    image_threshold: float | None = Field(None, description="override the bundle's image threshold")
    pixel_threshold: float | None = Field(None, description="override the bundle's pixel threshold")
    min_region_px: int = Field(1, ge=1, description="smaller connected regions are not reported")


class OutboxSettings(_Section):
    max_messages: int = Field(100_000, gt=0, description="pending messages kept while the broker is away; "
                              "beyond it the oldest are discarded (and reported)")
    max_bytes: int = Field(1024 ** 3, gt=0, description="payload bytes kept while the broker is away; beyond "
                           "it the oldest are discarded (and reported)")


class ResultSettings(_Section):
    include_mask: bool = Field(True, description="base64 PNG mask in each result that carries regions")
    regions_on_pass: bool = Field(False, description="pass results carry regions and a mask too (by default only "
                                  "a fail does: its regions are the defect)")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGE_", env_nested_delimiter="__", extra="forbid")

    bundle: Path = Field(description="model bundle directory")
    station_id: str = Field("station", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="names this station")
    state_dir: Path = Field(Path("/var/lib/edge"), description="outbox database and other state")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log threshold")
    metrics_port: int = Field(9108, ge=0, lt=65536, description="Prometheus endpoint on 127.0.0.1 (0: off)")
    trusted_keys_dir: Path | None = Field(None, description="Ed25519 public keys (`*.pub`, `trainer keygen`): "
                                          "when set, only bundles signed by one of them are loaded")
    reload_watch: bool = Field(True, description="reload when the bundle's manifest changes (besides SIGHUP)")
    zmq: ZmqSettings = ZmqSettings()
    mqtt: MqttSettings = MqttSettings()
    inference: InferenceSettings = InferenceSettings()
    outbox: OutboxSettings = OutboxSettings()
    result: ResultSettings = ResultSettings()

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if self.mqtt.reconnect_min_s > self.mqtt.reconnect_max_s:
            raise ValueError("mqtt.reconnect_min_s must not exceed mqtt.reconnect_max_s")
        if self.mqtt.password is not None and self.mqtt.password_file is not None:
            raise ValueError("mqtt.password and mqtt.password_file are mutually exclusive")
        if self.mqtt.password is not None and self.mqtt.username is None:
            raise ValueError("mqtt.password needs mqtt.username")
        if self.mqtt.tls is not None and self.mqtt.tls.keyfile is not None and self.mqtt.tls.certfile is None:
            raise ValueError("mqtt.tls.keyfile needs mqtt.tls.certfile (the client certificate)")
        if self.zmq.mode == "sub" and not self.zmq.connect:
            raise ValueError("zmq.connect must list at least one endpoint in sub mode")
        return self

    @property
    def topic_prefix(self) -> str:
        return self.mqtt.topic_prefix or f"inspection/{self.station_id}"

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: explicit arguments, then EDGE_* environment, then the TOML file (if any).
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)


class SettingsError(Exception):
    """Unusable settings; the message names the key."""


def load_settings(config: Path | None = None, **overrides: object) -> Settings:
    if config is not None and not config.is_file():
        raise SettingsError(f"config file not found: {config}")

    class FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=config)

    try:
        return FileSettings(**overrides)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(settings)"
        problem = "unknown setting" if first["type"] == "extra_forbidden" else first["msg"]
        raise SettingsError(f"{config or 'settings'}: {key}: {problem}") from None
    except ValueError as err:  # e.g. TOML syntax
        raise SettingsError(f"{config}: {err}") from None


def reference_rows(model: type[BaseModel] = Settings, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(setting, environment variable, default, description) for every leaf setting."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        section = next((t for t in (field.annotation, *get_args(field.annotation))
                        if isinstance(t, type) and issubclass(t, BaseModel)), None)
        if section is not None:
            rows += reference_rows(section, f"{key}.")
            continue
        default = "(required)" if field.is_required() else field.get_default(call_default_factory=True)
        rows.append((key, "EDGE_" + key.upper().replace(".", "__"), f"`{default!s}`" if default != "(required)"
                     else default, field.description or ""))
    return rows


def reference_table() -> str:
    lines = ["| setting | environment variable | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{key}` | `{env}` | {default} | {text} |" for key, env, default, text in reference_rows()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference_table(), end="")

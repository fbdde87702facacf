"""Training configuration: a typed model, loaded from TOML, every key checked."""

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainer.data.pose import Augment
from trainer.data.synthesis import TEXTURE_WORDS, TextureSetting
from trainer.method import MethodConfig
from trainer.profiles import PROFILES


class ConfigError(Exception):
    """A configuration file or value that cannot be used; the message names it."""


class TrainConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _profile_learning_rate(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("profile", "small") in PROFILES:
            rate = PROFILES[data.get("profile", "small")].learning_rate
            data = {"lr_denoiser": rate, "lr_segmenter": rate, **data}
        return data

    @field_validator("textures", mode="before")
    @classmethod
    def _runs_without_a_texture_source(cls, value: object) -> object:
        return "none" if value is None else value  # config.json of runs from before the setting took words

    profile: Literal[tuple(PROFILES)] = Field("small", description="model size: tiny, small or paper")
    method: MethodConfig = MethodConfig()
    seed: int = Field(0, ge=0, description="seeds data split, synthesis, initialisation and noise draws")
    batch_size: int = Field(8, gt=0, description="normal images per step; as many synthetic ones are added")
    lr_denoiser: float = Field(gt=0, description="default: the profile's learning rate")
    lr_segmenter: float = Field(gt=0, description="default: the profile's learning rate")
    warmup_fraction: float = Field(0.02, ge=0, lt=1, description="linear warm-up, as a fraction of the run")
    final_lr_fraction: float = Field(0.05, ge=0, le=1, description="cosine decay ends at this fraction of the peak lr")
    weight_decay: float = Field(0.0, ge=0, description="Adam's L2 weight decay")
    epochs: int = Field(3000, gt=0, description="used when neither --max-steps nor --time-limit bounds the run")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of train/good held out to choose the checkpoint")
    calibration_fraction: float = Field(0.2, gt=0, lt=1, description="share of train/good held out to set the "
                                        "thresholds (nothing else sees it)")
    val_every: int = Field(100, gt=0, description="steps between validations (model selection)")
    checkpoint_every: int = Field(100, gt=0, description="steps between resumable checkpoints")
    foreground: Literal["auto", "object", "texture"] = Field(
        "auto", description="where synthetic defects may appear; auto: object if most training images show one "
                            "(the decision is logged and kept in config.json)")
    color: Literal["auto", "rgb", "gray"] = Field(
        "auto", description="model channels; auto: gray (one channel) if under 1 % of the training pixels "
                            "have colour, else rgb (the decision is logged and kept in config.json; default measured: "
                            "README, Colour mode)")
    augment: Augment = Field(
        "auto", description="training images turned and moved as the part varies on the line (never mirrored): "
                            "rotate (any angle, a sixteenth of the side), shift (that shift only), none; auto: as "
                            "far as the training images themselves vary (the decision is logged and kept in "
                            "config.json; default measured: README, Pose tolerance). Set none where a part's "
                            "orientation is what is inspected")
    foreground_masks: Path | None = Field(None, description="folder of user foreground masks (by image stem)")
    textures: TextureSetting = Field(
        "auto", description="texture source of synthetic defects: a folder of texture images (e.g. DTD), or "
                            "procedural: pictures the product draws (surfaces and shapes); none: the image's own "
                            "shuffled tiles only; auto: procedural on objects, none on textures (the decision is "
                            "logged and kept in config.json; default measured: README, Texture source)")
    texture_probability: float = Field(0.5, ge=0, le=1, description="chance of a texture source (objects)")
    false_reject_rate: float = Field(0.01, gt=0, lt=1, description="calibration target on normal images")
    tiles_per_side: int = Field(
        1, ge=1, le=8, description="n > 1: frames are resized to n profile-size tiles a side, overlapping by a "
                                   "quarter (small: n = 3 → 320 px, n = 5 → 512 px), and inspected tile by tile at that "
                                   "resolution, at n² the cost per frame; training draws random tiles (measured: "
                                   "README, Large frames)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="training arithmetic; auto: bf16 on a CPU with AVX-512 BF16 or AMX, else fp32; "
                            "bf16 on GPUs and CPUs, fp16 on CUDA GPUs only (default measured: README, bf16 training)")
    denoiser_start: Literal["shipped", "scratch"] = Field(
        "shipped", description="shipped: the product's denoiser pretrained on procedural pictures, for this "
                               "profile and colour mode where there is one (small), else scratch (default measured: "
                               "README, Colour mode)")
    grad_checkpointing: bool = Field(False, description="recompute denoiser activations to save memory")
    num_workers: int = Field(1, ge=0, description="data-loader processes for synthesis")


def load_train_config(path: Path | None, **overrides: object) -> TrainConfig:
    """Read a TOML config (optional) and apply command-line overrides; one clear error otherwise."""
    data: dict = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from None
        # Paths in a config file are relative to the file, so configs/ works from any directory.
        for key in ("textures", "foreground_masks"):
            if isinstance(data.get(key), str) and data[key] not in TEXTURE_WORDS:
                data[key] = str((path.parent / data[key]).resolve())
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "(top level)"
        where = f"{path}: " if path else ""
        problem = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        raise ConfigError(f"{where}{key}: {problem}") from None


def reference_rows() -> list[tuple[str, str, str]]:
    """(key, default, meaning) of every training setting, the method's under `method.`."""
    per_profile = ", ".join(f"{name} {profile.learning_rate:g}" for name, profile in PROFILES.items())
    rows = []
    for prefix, model in (("", TrainConfig), ("method.", MethodConfig)):
        for name, field in model.model_fields.items():
            if field.annotation is MethodConfig:
                continue  # its keys follow under method.
            default = f"`{field.get_default()!s}`" if not field.is_required() else f"per profile: {per_profile}"
            rows.append((f"{prefix}{name}", default, field.description or ""))
    return rows


def reference_table() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += [f"| `{key}` | {default} | {text} |" for key, default, text in reference_rows()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference_table(), end="")

"""Model profiles: configs, not subclasses. `tiny` for tests, `small` for CPU stations and CPU
training, `paper` for the reference architecture of METHOD.md (GPUs)."""

from dataclasses import dataclass

from trainer.nets.denoiser import DenoiserConfig


@dataclass(frozen=True)
class Profile:
    name: str
    image_size: int
    denoiser: DenoiserConfig
    segmenter_channels: tuple[int, ...]
    # Default peak learning rate for both networks: the paper's 1e-4 is tuned for 16 GPU-hours;
    # the CPU profiles get ~1k steps, and every measured CPU run learned more at 1e-3.
    learning_rate: float


PROFILES: dict[str, Profile] = {
    "tiny": Profile(
        name="tiny",
        image_size=64,
        denoiser=DenoiserConfig(
            base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
            attention_resolutions=(16,), num_heads=2, norm_groups=8,
        ),
        segmenter_channels=(8, 16, 32, 32),
        learning_rate=1e-3,
    ),
    "small": Profile(
        name="small",
        image_size=128,
        denoiser=DenoiserConfig(
            base_channels=16, channel_mult=(1, 2, 4, 8), num_res_blocks=1,
            attention_resolutions=(16,), num_heads=4, norm_groups=8,
        ),
        segmenter_channels=(16, 32, 64, 64, 64),
        learning_rate=1e-3,
    ),
    "paper": Profile(
        name="paper",
        image_size=256,
        denoiser=DenoiserConfig(
            base_channels=128, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
            attention_resolutions=(32, 16, 8), num_heads=4, norm_groups=32,
        ),
        segmenter_channels=(64, 128, 256, 512, 512, 512),
        learning_rate=1e-4,
    ),
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}") from None

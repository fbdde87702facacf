"""The trained pair (denoiser + segmenter) of one profile, and its fused inference graph."""

from torch import nn

from trainer.fused import FusedInference
from trainer.method import MethodConfig
from trainer.nets.denoiser import Denoiser
from trainer.nets.segmenter import Segmenter
from trainer.profiles import Profile
from trainer.radar import RadarConstants, RadarInference
from trainer.tiling import frame_size


class DiffusionAD(nn.Module):
    """channels: 3 for RGB parts, 1 for gray ones (the training data decides; config.json keeps it).
    The networks see `image_size` squares; the inference graphs take frames of `frame_size`, cut
    into tiles_per_side² overlapping tiles when that is more than one."""

    def __init__(self, profile: Profile, channels: int = 3, tiles_per_side: int = 1):
        super().__init__()
        self.image_size = profile.image_size
        self.tiles_per_side = tiles_per_side
        self.frame_size = frame_size(profile.image_size, tiles_per_side)
        self.channels = channels
        self.denoiser = Denoiser(profile.denoiser, profile.image_size, channels)
        self.segmenter = Segmenter(profile.segmenter_channels, in_channels=2 * channels)

    def fused(self, method: MethodConfig, on_tiles: bool = False) -> FusedInference:
        """The one-step norm-guided inference graph over these (shared, not copied) networks: on
        whole frames, or `on_tiles` on single tiles (choosing the checkpoint of a tiled model)."""
        per_side = 1 if on_tiles else self.tiles_per_side
        return FusedInference(self.denoiser, self.segmenter, method, self.image_size, per_side)

    def radar(self, method: MethodConfig, constants: RadarConstants, on_tiles: bool = False) -> RadarInference:
        """The RADAR graph over this denoiser: on whole frames, or `on_tiles` on single tiles
        (choosing a tiled model's constants)."""
        per_side = 1 if on_tiles else self.tiles_per_side
        return RadarInference(self.denoiser, method, self.image_size, constants, per_side)

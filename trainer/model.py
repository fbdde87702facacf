"""The trained pair (denoiser + segmenter) of one profile, and its fused inference graph."""

from torch import nn

from trainer.fused import FusedInference
from trainer.method import MethodConfig
from trainer.nets.denoiser import Denoiser
from trainer.nets.segmenter import Segmenter
from trainer.profiles import Profile


class DiffusionAD(nn.Module):
    """channels: 3 for RGB parts, 1 for gray ones (the training data decides; config.json keeps it)."""

    def __init__(self, profile: Profile, channels: int = 3):
        super().__init__()
        self.image_size = profile.image_size
        self.channels = channels
        self.denoiser = Denoiser(profile.denoiser, profile.image_size, channels)
        self.segmenter = Segmenter(profile.segmenter_channels, in_channels=2 * channels)

    def fused(self, method: MethodConfig) -> FusedInference:
        """The one-step norm-guided inference graph over these (shared, not copied) networks."""
        return FusedInference(self.denoiser, self.segmenter, method, self.image_size)

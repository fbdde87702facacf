"""The fused one-step norm-guided inference: the whole graph that is exported to a bundle.

uint8 RGB [B, H, W, 3] at frame resolution in; anomaly_map [B, H, W] in [0, 1] and score [B] out.
Normalisation, the reduction to gray for a gray model, the cut into tiles of the networks' size
(when frames are larger) and the stitching of their maps, both noise scales, the batched denoiser
call, guidance, segmenter and top-K score all live inside the graph; thresholds stay outside it.
"""

import numpy as np
import torch
from torch import Tensor, nn

from trainer.diffusion import linear_alpha_bars, norm_guided_x0, q_sample, top_k_mean
from trainer.method import MethodConfig
from trainer.tiling import Tiling


# ITU-R BT.601 luma, as OpenCV's RGB2GRAY: a mono camera's frame, sent as RGB with equal channels,
# comes back as its own gray values.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def fixed_noise(seed: int, image_size: int, channels: int = 3) -> Tensor:
    """The seeded noise pair (ε₁ for t_s, ε₂ for t_b), shared by every image of every batch."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((2, channels, image_size, image_size), generator=generator)


def uint8_nhwc_to_unit_range(images: Tensor) -> Tensor:
    """uint8 [B, H, W, 3] → float [B, 3, H, W] in [-1, 1]. Cast first: TensorRT wants a uint8
    network input converted to float before any other layer touches it."""
    return images.float().permute(0, 3, 1, 2) / 127.5 - 1.0


def to_model_channels(images: Tensor, channels: int) -> Tensor:
    """RGB [B, 3, H, W] → [B, channels, H, W]: unchanged for an RGB model, luma for a gray one."""
    if channels == 3:
        return images
    red, green, blue = LUMA_WEIGHTS  # Python floats: the exported graph holds no extra tensor constant
    return red * images[:, 0:1] + green * images[:, 1:2] + blue * images[:, 2:3]


def model_input(images: Tensor, channels: int) -> Tensor:
    """uint8 RGB [B, H, W, 3] → the model's input: [B, channels, H, W] in [-1, 1]. Training data and
    every exported graph go through this one function."""
    return to_model_channels(uint8_nhwc_to_unit_range(images), channels)


def unit_range_to_uint8_nhwc(images: Tensor) -> np.ndarray:
    """float [N, C, H, W] in [-1, 1] → uint8 RGB [N, H, W, 3], a gray image (C = 1) as three equal
    channels: the inverse of model_input, exact for uint8 images (gray ones: with equal channels)."""
    rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    return ((rgb + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


class FusedInference(nn.Module):
    def __init__(self, denoiser: nn.Module, segmenter: nn.Module, method: MethodConfig, image_size: int,
                 tiles_per_side: int = 1):
        super().__init__()
        self.denoiser = denoiser
        self.segmenter = segmenter
        self.guidance_w = method.guidance_w
        self.top_k = method.top_k
        self.channels = denoiser.channels
        self.tiling = Tiling(image_size, tiles_per_side)
        alpha_bars = linear_alpha_bars(method.num_timesteps, method.beta_start, method.beta_end)
        self.register_buffer("alpha_bar_s", alpha_bars[method.t_s].float().reshape(1))
        self.register_buffer("alpha_bar_b", alpha_bars[method.t_b].float().reshape(1))
        self.register_buffer("t_s", torch.tensor([float(method.t_s)]))
        self.register_buffer("t_b", torch.tensor([float(method.t_b)]))
        self.register_buffer("noise", fixed_noise(method.noise_seed, image_size, self.channels))

    def _reconstruct_tiles(self, x0: Tensor) -> Tensor:
        batch = x0.shape[0]
        ab_s, ab_b = self.alpha_bar_s.expand(batch), self.alpha_bar_b.expand(batch)
        x_ts = q_sample(x0, ab_s, self.noise[0].expand_as(x0))
        x_tb = q_sample(x0, ab_b, self.noise[1].expand_as(x0))
        # Both scales in one denoiser call of batch 2B with a per-sample t.
        t = torch.cat([self.t_s.expand(batch), self.t_b.expand(batch)])
        eps_s, eps_b = self.denoiser(torch.cat([x_ts, x_tb]), t).unflatten(0, (2, batch)).unbind(0)
        return norm_guided_x0(x_ts, x_tb, eps_s, eps_b, ab_s, ab_b, self.guidance_w)

    def _map_tiles(self, x0: Tensor) -> Tensor:
        return self.segmenter(torch.cat([x0, self._reconstruct_tiles(x0)], dim=1))[:, 0]

    def reconstruct(self, x0: Tensor) -> Tensor:
        """Norm-guided one-step reconstruction x̂0_g of model inputs (model_input): [B, C, H, W]."""
        return self.tiling.map(self._reconstruct_tiles, x0)

    def score(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        """Model inputs [B, C, H, W] → (anomaly_map [B, H, W], score [B]), the score over the whole frame."""
        anomaly_map = self.tiling.map(self._map_tiles, x0)
        return anomaly_map, top_k_mean(anomaly_map, self.top_k)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.score(model_input(images, self.channels))

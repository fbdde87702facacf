"""RADAR, the reconstruction-free head (docs/method.md): one forward-diffusion step at t_radar with
fixed seeded noise, one denoiser pass, and the noise discrepancy turned into an edge response.

uint8 RGB [B, H, W, 3] in; anomaly_map [B, H, W] in [0, 1) and the two image features [B, 2] out.
The image decision (a one-class model over the features) and the thresholds stay outside the graph.

The math is small pure functions over [B, C, H, W] tensors, checked in float64 by the tests; the
filter kernels are arguments (the head keeps them as buffers) so an exported graph holds constants.
"""

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from trainer.diffusion import linear_alpha_bars, q_sample
from trainer.fused import fixed_noise, model_input
from trainer.method import MethodConfig
from trainer.tiling import Tiling

BLUR_KSIZE = 5   # RADAR's Gaussian blur of the discrepancy
SOBEL_KSIZE = 5  # RADAR's Sobel filter of the blurred discrepancy
WINDOW_AT_256 = 20  # RADAR's 20×20 feature windows (stride 20) on a ~256² image, scaled to the model's size
# t_radar is chosen among these on validation: small scales, inside the range [0, tau) the denoiser
# was trained on as "small" noise.
T_CANDIDATES = (25, 50, 100, 150, 200, 250)

# What is compared (docs/method.md): "residual" = ε̂ − ε, the part of the prediction that is not the
# noise we injected (we know ε exactly, so its own randomness cancels); "predicted" = ε̂ itself, the
# paper's reading (a normal image's ε̂ looks Gaussian, the blur averages it away, structure remains).
Discrepancy = Literal["residual", "predicted"]
DISCREPANCIES: tuple[Discrepancy, ...] = get_args(Discrepancy)


class RadarConstants(BaseModel):
    """What the RADAR head needs besides the denoiser; chosen on validation, stored with the run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    t: int = Field(gt=0, description="t_radar, the single noise scale")
    discrepancy: Discrepancy
    window: int = Field(gt=0, description="side of the feature windows, pixels at model resolution")
    map_scale: float = Field(gt=0, description="response that maps to 0.5 in the anomaly map")


def feature_window(image_size: int) -> int:
    return max(1, round(WINDOW_AT_256 * image_size / 256))


def binomial_kernel(ksize: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """1-D binomial smoothing of `ksize` taps, sum 1: the Gaussian OpenCV uses by default for 3 and
    5 taps (cv2.GaussianBlur with sigma 0)."""
    taps = torch.tensor([math.comb(ksize - 1, i) for i in range(ksize)], dtype=dtype)
    return taps / taps.sum()


def sobel_kernels(ksize: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """(smoothing, derivative) 1-D factors of the `ksize` Sobel filter, as OpenCV builds them:
    binomial smoothing, and a binomial of two taps fewer convolved with the central difference."""
    smooth = binomial_kernel(ksize, dtype) * 2 ** (ksize - 1)
    inner = torch.tensor([math.comb(ksize - 3, i) for i in range(ksize - 2)], dtype=dtype)
    derivative = F.conv1d(F.pad(inner, (2, 2))[None, None], torch.tensor([[[1.0, 0.0, -1.0]]], dtype=dtype))[0, 0]
    return smooth, derivative


def separable_filter(x: Tensor, vertical: Tensor, horizontal: Tensor) -> Tensor:
    """Correlate every channel of [B, C, H, W] with outer(vertical, horizontal); borders reflected
    without repeating the edge pixel (OpenCV's default border)."""
    channels, k = x.shape[1], vertical.shape[0]
    kernel = (vertical[:, None] * horizontal[None, :]).to(x.dtype)
    padded = F.pad(x, (k // 2,) * 4, mode="reflect")
    return F.conv2d(padded, kernel.expand(channels, 1, k, k), groups=channels)


def edge_response(discrepancy: Tensor, blur: Tensor, smooth: Tensor, derivative: Tensor) -> Tensor:
    """Blur, then Sobel gradient magnitude summed over channels: [B, C, H, W] → [B, H, W]."""
    blurred = separable_filter(discrepancy, blur, blur)
    gx = separable_filter(blurred, smooth, derivative)
    gy = separable_filter(blurred, derivative, smooth)
    return (gx.square() + gy.square()).sum(dim=1).sqrt()


def image_features(response: Tensor, window: int) -> Tensor:
    """RADAR's two features of each response map: its total L2 norm and the largest L2 norm over
    non-overlapping window × window tiles (a partial last row/column of tiles is left out): [B, 2]."""
    total = response.square().flatten(1).sum(dim=1).sqrt()
    tiles = F.avg_pool2d(response.square()[:, None], window, stride=window) * window**2
    return torch.stack([total, tiles.flatten(1).amax(dim=1).sqrt()], dim=1)


def squash(response: Tensor, scale: Tensor | float) -> Tensor:
    """Unbounded non-negative response → [0, 1), monotone: the station's anomaly-map range."""
    return response / (response + scale)


class RadarInference(nn.Module):
    """The RADAR graph over a trained denoiser (shared, not copied)."""

    def __init__(self, denoiser: nn.Module, method: MethodConfig, image_size: int, constants: RadarConstants,
                 tiles_per_side: int = 1):
        super().__init__()
        self.tiling = Tiling(image_size, tiles_per_side)
        self.denoiser = denoiser
        self.constants = constants
        self.window = constants.window
        self.discrepancy = constants.discrepancy
        self.channels = denoiser.channels
        alpha_bars = linear_alpha_bars(method.num_timesteps, method.beta_start, method.beta_end)
        self.register_buffer("alpha_bar", alpha_bars[constants.t].float().reshape(1))
        self.register_buffer("t", torch.tensor([float(constants.t)]))
        self.register_buffer("map_scale", torch.tensor([constants.map_scale]))
        # The norm-guided head's ε₁: one seeded draw serves both heads.
        self.register_buffer("noise", fixed_noise(method.noise_seed, image_size, self.channels)[:1])
        smooth, derivative = sobel_kernels(SOBEL_KSIZE, torch.float32)
        self.register_buffer("blur", binomial_kernel(BLUR_KSIZE, torch.float32))
        self.register_buffer("sobel_smooth", smooth)
        self.register_buffer("sobel_derivative", derivative)

    def _discrepancies(self, x0: Tensor) -> dict[str, Tensor]:
        """Model inputs at the networks' size → both discrepancies from one denoiser pass, by name."""
        batch = x0.shape[0]
        noise = self.noise.expand_as(x0)
        eps_hat = self.denoiser(q_sample(x0, self.alpha_bar.expand(batch), noise), self.t.expand(batch))
        return {"residual": eps_hat - noise, "predicted": eps_hat}

    def _edge_response(self, discrepancy: Tensor) -> Tensor:
        return edge_response(discrepancy, self.blur, self.sobel_smooth, self.sobel_derivative)

    def responses(self, x0: Tensor) -> dict[str, Tensor]:
        """Model inputs [B, C, H, W] → the edge response [B, H, W] of every discrepancy, by name (one
        denoiser pass for all: choosing the discrepancy compares them)."""
        discrepancies = self._discrepancies(self.tiling.split(x0))
        return {name: self.tiling.stitch(self._edge_response(d)) for name, d in discrepancies.items()}

    def response(self, x0: Tensor) -> Tensor:
        """Model inputs [B, C, H, W] → edge response of the noise discrepancy [B, H, W]."""
        return self.tiling.map(lambda tiles: self._edge_response(self._discrepancies(tiles)[self.discrepancy]), x0)

    def score(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        """Model inputs → (anomaly_map [B, H, W], features [B, 2])."""
        response = self.response(x0)
        return squash(response, self.map_scale), image_features(response, self.window)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.score(model_input(images, self.channels))

"""The joint training objective as a module (so DDP can wrap it), and the learning-rate schedule."""

import math

import torch
from torch import Tensor, nn

from trainer.diffusion import linear_alpha_bars, norm_guided_x0, q_sample
from trainer.losses import mask_loss, noise_loss
from trainer.method import MethodConfig
from trainer.model import DiffusionAD


def denoise_both_scales(
    denoiser: nn.Module, x0: Tensor, t_s: Tensor, t_b: Tensor, eps_s: Tensor, eps_b: Tensor, alpha_bars: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x0 noised at the small and the big scale, both through the denoiser in one call:
    (x_ts, x_tb, ε̂_s, ε̂_b)."""
    x_ts, x_tb = q_sample(x0, alpha_bars[t_s], eps_s), q_sample(x0, alpha_bars[t_b], eps_b)
    eps_s_hat, eps_b_hat = denoiser(torch.cat([x_ts, x_tb]), torch.cat([t_s, t_b])).chunk(2)
    return x_ts, x_tb, eps_s_hat, eps_b_hat


class JointObjective(nn.Module):
    """L = L_noise (normal half only) + L_mask, with x̂0_g not detached (mask gradients reach the
    denoiser). All randomness (timesteps, noise) comes in as arguments, so a step is reproducible."""

    def __init__(self, model: DiffusionAD, method: MethodConfig):
        super().__init__()
        self.model = model
        self.guidance_w = method.guidance_w
        alpha_bars = linear_alpha_bars(method.num_timesteps, method.beta_start, method.beta_end)
        self.register_buffer("alpha_bars", alpha_bars.float(), persistent=False)

    def forward(
        self, normal: Tensor, anomalous: Tensor, mask: Tensor,
        t_s: Tensor, t_b: Tensor, eps_s_true: Tensor, eps_b_true: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Batch of B normal + B synthetic images → (total, noise, mask) losses.

        t_s, t_b: long [2B]; eps_*_true: [2B, C, H, W], C the model's channels."""
        n = normal.shape[0]
        x0 = torch.cat([normal, anomalous])
        ab_s, ab_b = self.alpha_bars[t_s], self.alpha_bars[t_b]
        x_ts, x_tb, eps_s, eps_b = denoise_both_scales(self.model.denoiser, x0, t_s, t_b, eps_s_true, eps_b_true,
                                                       self.alpha_bars)
        l_noise = noise_loss(eps_s_true[:n], eps_s[:n]) + noise_loss(eps_b_true[:n], eps_b[:n])
        x0_g = norm_guided_x0(x_ts, x_tb, eps_s, eps_b, ab_s, ab_b, self.guidance_w)
        logits = self.model.segmenter.logits(torch.cat([x0, x0_g], dim=1))
        target = torch.cat([torch.zeros_like(mask), mask])
        l_mask = mask_loss(logits.float(), target)
        return l_noise + l_mask, l_noise, l_mask


def draw_step_randomness(
    batch: int, shape: tuple[int, ...], method: MethodConfig, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample t_s ∈ [0, τ), t_b ∈ [τ, T) and the two noise tensors for a batch of `batch`."""
    t_s = torch.randint(0, method.tau, (batch,), generator=generator)
    t_b = torch.randint(method.tau, method.num_timesteps, (batch,), generator=generator)
    eps_s = torch.randn((batch, *shape), generator=generator)
    eps_b = torch.randn((batch, *shape), generator=generator)
    return t_s, t_b, eps_s, eps_b


def lr_factor(progress: float, warmup: float, final: float) -> float:
    """Linear warm-up to 1 over `warmup` of the run, then cosine decay to `final` at progress 1."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return progress / warmup
    decay = (progress - warmup) / (1 - warmup)
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * decay))

"""Diffusion math as pure tensor functions: the schedule, noising, one-step inversion,
norm guidance and iterative DDPM reconstruction. No network lives here; a denoiser is any
callable ``eps_model(x_t, t) -> eps_hat``.

Images are in [-1, 1] (the DDPM convention); x0 estimates are clamped to that range.
"""

from collections.abc import Callable

import torch
from torch import Tensor

EpsModel = Callable[[Tensor, Tensor], Tensor]


def linear_alpha_bars(num_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """ᾱ_t = Π_{i<=t} (1 - β_i) for a linear β schedule, float64, shape [T]."""
    betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def _bcast(coef: Tensor, like: Tensor) -> Tensor:
    """Per-sample coefficient [B] (or scalar) → shape broadcastable to an image batch."""
    return coef.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def q_sample(x0: Tensor, alpha_bar: Tensor, noise: Tensor) -> Tensor:
    """Forward noising: x_t = √ᾱ_t·x0 + √(1-ᾱ_t)·ε."""
    a = _bcast(alpha_bar, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def predict_x0(x_t: Tensor, alpha_bar: Tensor, eps: Tensor) -> Tensor:
    """One-step estimate: x̂0 = (x_t - √(1-ᾱ_t)·ε̂) / √ᾱ_t (the exact inverse of q_sample)."""
    a = _bcast(alpha_bar, x_t)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def norm_guided_x0(
    x_ts: Tensor,
    x_tb: Tensor,
    eps_s: Tensor,
    eps_b: Tensor,
    alpha_bar_s: Tensor,
    alpha_bar_b: Tensor,
    w: float,
) -> Tensor:
    """Norm-guided reconstruction (METHOD.md inference steps 3-6), clamped to [-1, 1]."""
    x0_b = predict_x0(x_tb, alpha_bar_b, eps_b).clamp(-1, 1)
    n_ts = q_sample(x0_b, alpha_bar_s, eps_s)
    eps_guided = eps_s - _bcast((1 - alpha_bar_s).sqrt(), x_ts) * w * (n_ts - x_ts)
    return predict_x0(x_ts, alpha_bar_s, eps_guided).clamp(-1, 1)


def top_k_mean(maps: Tensor, k: int) -> Tensor:
    """Mean of the k largest values of each map: [B, ...] → [B]."""
    return maps.flatten(1).topk(k, dim=1).values.mean(dim=1)


@torch.no_grad()
def ddpm_reconstruct(
    eps_model: EpsModel,
    x0: Tensor,
    alpha_bars: Tensor,
    t_start: int,
    generator: torch.Generator,
) -> Tensor:
    """Iterative DDPM reconstruction: noise x0 to t_start, then t_start ancestral steps back to 0.

    The baseline the one-step method is compared against (≈t_start denoiser passes).
    ``alpha_bars`` is the float64 schedule of ``linear_alpha_bars``.
    """
    def randn() -> Tensor:
        return torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)

    batch = x0.shape[0]

    def x0_hat_at(x: Tensor, t: int) -> Tensor:
        eps = eps_model(x, torch.full((batch,), t, dtype=torch.long, device=x.device))
        return predict_x0(x, alpha_bars[t].expand(batch), eps).clamp(-1, 1)

    x = q_sample(x0, alpha_bars[t_start].expand(batch), randn())
    for t in range(t_start, 0, -1):
        # Ancestral step from the posterior q(x_{t-1} | x_t, x̂0) of Ho et al. (2020), eq. 7.
        ab_t, ab_prev = alpha_bars[t], alpha_bars[t - 1]
        beta_t = 1 - ab_t / ab_prev
        coef_x0 = (ab_prev.sqrt() * beta_t / (1 - ab_t)).to(x.dtype)
        coef_xt = ((1 - beta_t).sqrt() * (1 - ab_prev) / (1 - ab_t)).to(x.dtype)
        std = (beta_t * (1 - ab_prev) / (1 - ab_t)).sqrt().to(x.dtype)
        x = coef_x0 * x0_hat_at(x, t) + coef_xt * x + std * randn()
    return x0_hat_at(x, 0)

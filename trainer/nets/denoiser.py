"""The ε-prediction U-Net (guided-diffusion style), assembled from a short config.

Blocks: a time-embedded residual block (scale-shift norm, optional BigGAN-style down/up
resampling inside the block), a multi-head self-attention block, and one model class.
"""

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class DenoiserConfig:
    base_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]  # feature-map sides (px) that get self-attention
    num_heads: int
    norm_groups: int = 32
    dropout: float = 0.0


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: [B] → [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        emb_dim: int,
        groups: int,
        dropout: float,
        resample: Literal["none", "down", "up"] = "none",
    ):
        super().__init__()
        self.in_norm = nn.GroupNorm(groups, in_ch)
        self.in_conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch)
        self.out_norm = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)
        self.resample = resample

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_conv(self._resample(F.silu(self.in_norm(x))))
        x = self._resample(x)
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.out_norm(h) * (1 + scale) + shift
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    def __init__(self, channels: int, num_heads: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))
        self.num_heads = num_heads

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # [B, heads, HW, C/heads]
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Stage(nn.ModuleList):
    """Blocks applied in order; each receives the time embedding."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for block in self:
            x = block(x, emb)
        return x


class Denoiser(nn.Module):
    """ε_θ(x_t, t): predicts the noise added to a [-1, 1] image (RGB, or gray) at timestep t."""

    def __init__(self, cfg: DenoiserConfig, image_size: int, channels: int = 3):
        super().__init__()
        self.channels = channels
        base, groups, drop = cfg.base_channels, cfg.norm_groups, cfg.dropout
        emb_dim = 4 * base
        self.base_channels = base
        self.grad_checkpointing = False  # recompute stage activations in backward to save memory
        self.time_mlp = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def res(i: int, o: int, resample: Literal["none", "down", "up"] = "none") -> ResBlock:
            return ResBlock(i, o, emb_dim, groups, drop, resample)

        def with_attention(blocks: list[nn.Module], ch: int, side: int) -> list[nn.Module]:
            if side in cfg.attention_resolutions:
                blocks.append(AttentionBlock(ch, cfg.num_heads, groups))
            return blocks

        self.input_conv = nn.Conv2d(channels, base, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [base]
        ch, side = base, image_size
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(Stage(with_attention([res(ch, mult * base)], mult * base, side)))
                ch = mult * base
                skip_channels.append(ch)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(Stage([res(ch, ch, "down")]))
                side //= 2
                skip_channels.append(ch)

        self.middle = Stage([res(ch, ch), AttentionBlock(ch, cfg.num_heads, groups), res(ch, ch)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                blocks = with_attention([res(ch + skip_channels.pop(), mult * base)], mult * base, side)
                ch = mult * base
                if level > 0 and i == cfg.num_res_blocks:
                    blocks.append(res(ch, ch, "up"))
                    side *= 2
                self.up.append(Stage(blocks))

        self.out = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), _zero(nn.Conv2d(ch, channels, 3, padding=1)))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.base_channels).to(x.dtype))
        h = self.input_conv(x)
        skips = [h]
        for stage in self.down:
            h = self._run(stage, h, emb)
            skips.append(h)
        h = self._run(self.middle, h, emb)
        for stage in self.up:
            h = self._run(stage, torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)

    def _run(self, stage: Stage, h: Tensor, emb: Tensor) -> Tensor:
        if self.grad_checkpointing and self.training:
            return checkpoint(stage, h, emb, use_reentrant=False)
        return stage(h, emb)

"""The fused one-step inference: equal to the step-by-step method, deterministic, exportable."""

import copy

import pytest
import torch
from conftest import hazelnut_images

from trainer.diffusion import linear_alpha_bars, norm_guided_x0, q_sample
from trainer.fused import FusedInference, fixed_noise
from trainer.method import MethodConfig
from trainer.model import DiffusionAD
from trainer.profiles import get_profile

PROFILE = get_profile("tiny")
METHOD = MethodConfig()


def untrained_but_nontrivial(seed: int, channels: int = 3) -> DiffusionAD:
    """A tiny model whose zero-initialised output layers and BN statistics are randomised,
    so that every term of the method contributes to the output."""
    torch.manual_seed(seed)
    model = DiffusionAD(PROFILE, channels)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if torch.count_nonzero(p) == 0 and "bias" not in name:
                p.normal_(0, 0.05)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def fused() -> FusedInference:
    return untrained_but_nontrivial(0).fused(METHOD).eval()


def random_uint8(batch: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    size = PROFILE.image_size
    return torch.randint(0, 256, (batch, size, size, 3), generator=gen, dtype=torch.uint8)


def step_by_step_float64(model: DiffusionAD, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """METHOD.md steps 1-7, one call per denoiser pass, in float64."""
    model = copy.deepcopy(model).double()
    ab = linear_alpha_bars(METHOD.num_timesteps, METHOD.beta_start, METHOD.beta_end)
    batch = images.shape[0]
    ab_s, ab_b = ab[METHOD.t_s].expand(batch), ab[METHOD.t_b].expand(batch)
    noise = fixed_noise(METHOD.noise_seed, PROFILE.image_size, model.channels).double()
    x0 = images.permute(0, 3, 1, 2).double() / 127.5 - 1
    if model.channels == 1:  # BT.601 luma
        x0 = (x0 * torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64).reshape(1, 3, 1, 1)).sum(1, keepdim=True)
    x_ts = q_sample(x0, ab_s, noise[0].expand_as(x0))
    x_tb = q_sample(x0, ab_b, noise[1].expand_as(x0))
    eps_s = model.denoiser(x_ts, torch.full((batch,), METHOD.t_s))
    eps_b = model.denoiser(x_tb, torch.full((batch,), METHOD.t_b))
    x0_g = norm_guided_x0(x_ts, x_tb, eps_s, eps_b, ab_s, ab_b, METHOD.guidance_w)
    maps = model.segmenter(torch.cat([x0, x0_g], dim=1))[:, 0]
    scores = maps.flatten(1).topk(METHOD.top_k, dim=1).values.mean(1)
    return maps, scores


@pytest.mark.parametrize("channels", [3, 1], ids=["rgb", "gray"])
@torch.no_grad()
def test_fused_module_equals_the_step_by_step_computation(channels):
    images = random_uint8(3, seed=1)
    maps, scores = untrained_but_nontrivial(0, channels).fused(METHOD).eval()(images)
    ref_maps, ref_scores = step_by_step_float64(untrained_but_nontrivial(0, channels), images)
    assert maps.shape == (3, PROFILE.image_size, PROFILE.image_size) and scores.shape == (3,)
    torch.testing.assert_close(maps.double(), ref_maps, rtol=0, atol=1e-5)
    torch.testing.assert_close(scores.double(), ref_scores, rtol=0, atol=1e-5)
    assert 0 <= maps.min() and maps.max() <= 1
    assert scores.std() > 0, "different images should score differently"


@torch.no_grad()
def test_the_guidance_really_uses_the_big_noise_scale(fused):
    """Changing only the big-scale noise changes the result: both passes reach the output."""
    images = random_uint8(1, seed=2)
    other = copy.deepcopy(fused)
    other.noise[1] = torch.randn_like(other.noise[1])
    assert not torch.allclose(fused.reconstruct(images.permute(0, 3, 1, 2) / 127.5 - 1),
                              other.reconstruct(images.permute(0, 3, 1, 2) / 127.5 - 1))


@torch.no_grad()
def test_same_image_same_score_every_call_alone_or_anywhere_in_a_batch(fused):
    batch = random_uint8(8, seed=3)
    first = fused(batch[5:6])[1]
    assert torch.equal(fused(batch[5:6])[1], first), "repeated calls must give identical scores"
    in_batch = fused(batch)[1]
    torch.testing.assert_close(in_batch[5:6], first, rtol=0, atol=1e-6)
    reordered = fused(batch.flip(0))[1]
    torch.testing.assert_close(reordered.flip(0), in_batch, rtol=0, atol=1e-6)


@pytest.mark.slow
@torch.no_grad()
def test_strict_export_with_dynamic_batch_matches_eager_on_real_images(fused, datasets_dir):
    batch_dim = torch.export.Dim("batch", min=1, max=16)
    example = random_uint8(2, seed=4)
    program = torch.export.export(fused, (example,), dynamic_shapes=({0: batch_dim},), strict=True)
    exported = program.module()
    images = torch.from_numpy(hazelnut_images(datasets_dir, PROFILE.image_size, count=5))
    for batch in (images[:1], images):
        maps, scores = exported(batch)
        ref_maps, ref_scores = fused(batch)
        torch.testing.assert_close(maps, ref_maps, rtol=0, atol=1e-5)
        torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-5)

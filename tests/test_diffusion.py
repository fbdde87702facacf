"""The diffusion math against float64 references."""

import numpy as np
import torch

from trainer.diffusion import (
    ddpm_reconstruct,
    linear_alpha_bars,
    norm_guided_x0,
    predict_x0,
    q_sample,
    top_k_mean,
)
from trainer.method import MethodConfig

METHOD = MethodConfig()


def alpha_bars() -> torch.Tensor:
    return linear_alpha_bars(METHOD.num_timesteps, METHOD.beta_start, METHOD.beta_end)


def test_alpha_bars_match_a_numpy_float64_reference():
    betas = np.linspace(1e-4, 2e-2, 1000)
    expected = np.cumprod(1 - betas)
    np.testing.assert_allclose(alpha_bars().numpy(), expected, rtol=1e-12)
    assert alpha_bars().dtype == torch.float64


def test_noising_and_one_step_inversion_are_exact_inverses_given_the_true_noise():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand((4, 3, 8, 8), generator=gen, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    ab = alpha_bars()[torch.tensor([0, 200, 400, 999])]
    x_t = q_sample(x0, ab, noise)
    torch.testing.assert_close(predict_x0(x_t, ab, noise), x0, rtol=0, atol=1e-9)
    # Per-sample coefficients really are per sample: sample 3 is almost pure noise.
    assert torch.corrcoef(torch.stack([x_t[3].flatten(), noise[3].flatten()]))[0, 1] > 0.99


def test_guidance_with_w_zero_equals_plain_one_step_from_t_s():
    gen = torch.Generator().manual_seed(1)
    shape = (2, 3, 8, 8)
    x0, e1, e2, es, eb = (torch.randn(shape, generator=gen, dtype=torch.float64) * 0.5 for _ in range(5))
    ab_s, ab_b = alpha_bars()[[200, 200]], alpha_bars()[[400, 400]]
    x_ts, x_tb = q_sample(x0, ab_s, e1), q_sample(x0, ab_b, e2)
    guided = norm_guided_x0(x_ts, x_tb, es, eb, ab_s, ab_b, w=0.0)
    torch.testing.assert_close(guided, predict_x0(x_ts, ab_s, es).clamp(-1, 1), rtol=0, atol=1e-12)
    # and w matters otherwise
    assert not torch.allclose(norm_guided_x0(x_ts, x_tb, es, eb, ab_s, ab_b, w=1.0), guided)


def test_guidance_matches_the_method_steps_written_out_in_float64():
    gen = torch.Generator().manual_seed(2)
    x0, e1, e2, es, eb = (torch.randn((1, 3, 4, 4), generator=gen, dtype=torch.float64) * 0.3 for _ in range(5))
    a_s, a_b, w = float(alpha_bars()[200]), float(alpha_bars()[400]), 0.7
    x_ts = np.sqrt(a_s) * x0 + np.sqrt(1 - a_s) * e1
    x_tb = np.sqrt(a_b) * x0 + np.sqrt(1 - a_b) * e2
    n = ((x_tb - np.sqrt(1 - a_b) * eb) / np.sqrt(a_b)).clamp(-1, 1)
    n_ts = np.sqrt(a_s) * n + np.sqrt(1 - a_s) * es
    eps_tilde = es - np.sqrt(1 - a_s) * w * (n_ts - x_ts)
    expected = ((x_ts - np.sqrt(1 - a_s) * eps_tilde) / np.sqrt(a_s)).clamp(-1, 1)
    got = norm_guided_x0(
        x_ts, x_tb, es, eb, alpha_bars()[[200]], alpha_bars()[[400]], w=w
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_top_k_mean_is_the_mean_of_the_k_largest_pixels():
    maps = torch.rand((3, 10, 10), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = [np.sort(m.numpy().ravel())[-7:].mean() for m in maps]
    np.testing.assert_allclose(top_k_mean(maps, 7).numpy(), expected, rtol=1e-12)


def test_iterative_reconstruction_with_an_oracle_denoiser_returns_the_image():
    """A denoiser that knows x0 predicts the exact noise, so every posterior mean points at x0."""
    gen = torch.Generator().manual_seed(4)
    x0 = torch.rand((2, 3, 8, 8), generator=gen, dtype=torch.float64) * 2 - 1
    ab = alpha_bars()
    calls = []

    def oracle(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(int(t[0]))
        a = ab[t].reshape(-1, 1, 1, 1)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    out = ddpm_reconstruct(oracle, x0, ab, t_start=50, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-9)
    assert calls == list(range(50, -1, -1))

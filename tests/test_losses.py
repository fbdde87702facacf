import numpy as np
import torch

from trainer.losses import focal_loss_from_logits, mask_loss


def reference_focal(p: np.ndarray, y: np.ndarray, alpha=0.5, gamma=4.0) -> float:
    pt = np.where(y == 1, p, 1 - p)
    alpha_t = np.where(y == 1, alpha, 1 - alpha)
    return float(np.mean(-alpha_t * (1 - pt) ** gamma * np.log(pt)))


def test_focal_loss_matches_its_definition_in_float64():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn((2, 1, 8, 8), generator=gen, dtype=torch.float64) * 3
    target = (torch.rand((2, 1, 8, 8), generator=gen) > 0.7).double()
    expected = reference_focal(torch.sigmoid(logits).numpy(), target.numpy())
    assert abs(focal_loss_from_logits(logits, target).item() - expected) < 1e-12


def test_mask_loss_is_smooth_l1_plus_five_focal_and_finite_at_extreme_logits():
    logits = torch.tensor([[-60.0, 60.0, 0.0]], dtype=torch.float64)
    target = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)
    p = torch.sigmoid(logits).numpy()
    smooth_l1 = np.mean(np.where(np.abs(p - target.numpy()) < 1, 0.5 * (p - target.numpy()) ** 2, np.abs(p - target.numpy()) - 0.5))
    expected = smooth_l1 + 5 * float(np.mean([0.5 * 60, 0.5 * 60, 0.5 * 0.5**4 * np.log(2)]))
    got = mask_loss(logits, target).item()
    assert np.isfinite(got) and abs(got - expected) < 1e-9

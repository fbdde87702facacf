"""Training losses of the joint objective (METHOD.md "Training")."""

import torch
import torch.nn.functional as F
from torch import Tensor


def focal_loss_from_logits(logits: Tensor, target: Tensor, alpha: float = 0.5, gamma: float = 4.0) -> Tensor:
    """Binary focal loss, mean over pixels; computed from logits so it stays finite in fp16/bf16."""
    log_p = F.logsigmoid(logits)
    log_not_p = F.logsigmoid(-logits)
    log_pt = target * log_p + (1 - target) * log_not_p
    alpha_t = target * alpha + (1 - target) * (1 - alpha)
    return (-alpha_t * (1 - log_pt.exp()) ** gamma * log_pt).mean()


def mask_loss(logits: Tensor, target: Tensor, focal_weight: float = 5.0) -> Tensor:
    """SmoothL1(M, M̂) + 5·Focal(M, M̂)."""
    return F.smooth_l1_loss(torch.sigmoid(logits), target) + focal_weight * focal_loss_from_logits(logits, target)


def noise_loss(eps_true: Tensor, eps_pred: Tensor) -> Tensor:
    """Mean squared noise-prediction error (the caller passes normal samples only)."""
    return F.mse_loss(eps_pred, eps_true)

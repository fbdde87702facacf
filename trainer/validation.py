"""Validation during training: scores on held-out normal images and their synthetic anomalies for
model selection, and on other held-out normal images for the thresholds (never the test set)."""

import numpy as np
import torch

from trainer.config import TrainConfig
from trainer.data.training_set import SyntheticDefects, ValidationSet, to_model_range
from trainer.evaluation.calibration import DetectionCeiling, calibrate
from trainer.evaluation.metrics import image_auroc, pixel_ap
from trainer.method import MethodConfig
from trainer.model import DiffusionAD


@torch.no_grad()
def score_images(model: DiffusionAD, method: MethodConfig, images: torch.Tensor, device: torch.device,
                 batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Deployment inference (fixed noise, t_s/t_b) on model inputs → (maps [N,H,W], scores [N]):
    frames of the model's frame size, or single tiles of its networks' size."""
    size = images.shape[-1]
    if size not in (model.frame_size, model.image_size):
        raise ValueError(f"images of {size} px are neither frames ({model.frame_size} px) nor tiles "
                         f"({model.image_size} px) of this model")
    was_training = model.training
    fused = model.eval().fused(method, on_tiles=size != model.frame_size).to(device)
    maps, scores = [], []
    for chunk in images.split(batch_size):
        m, s = fused.score(chunk.to(device))
        maps.append(m.cpu().numpy())
        scores.append(s.cpu().numpy())
    model.train(was_training)
    return np.concatenate(maps), np.concatenate(scores)


def validate(model: DiffusionAD, method: MethodConfig, val: ValidationSet, device: torch.device) -> dict:
    """Image AUROC (normal vs synthetic) and pixel AP; selection = their mean."""
    normal_maps, normal_scores = score_images(model, method, val.normal, device)
    anomal_maps, anomal_scores = score_images(model, method, val.anomalous, device)
    labels = np.r_[np.zeros(len(normal_scores), bool), np.ones(len(anomal_scores), bool)]
    masks = np.concatenate([np.zeros_like(normal_maps, dtype=bool), val.masks[:, 0].numpy() > 0.5])
    i_auroc = image_auroc(labels, np.r_[normal_scores, anomal_scores])
    p_ap = pixel_ap(masks, np.concatenate([normal_maps, anomal_maps]))
    return {"image_auroc": float(i_auroc), "pixel_ap": float(p_ap), "selection": float((i_auroc + p_ap) / 2)}


def calibrate_run(model: DiffusionAD, cfg: TrainConfig, calibration: np.ndarray, defects: SyntheticDefects,
                  val: ValidationSet, device: torch.device) -> dict:
    """Thresholds under both policies from the calibration images (uint8 NHWC good parts the model
    was neither trained nor selected on); `default` is the false-reject-rate one (needs no defects),
    capped by what catches the synthetic `defects` made on those images (see calibration.py).

    max-F1 here takes the selection split's synthetic anomalies as its labelled defects."""
    normal = torch.stack([to_model_range(image, model.channels) for image in calibration])
    normal_maps, normal_scores = score_images(model, cfg.method, normal, device)
    defect_maps, defect_scores = score_images(model, cfg.method, defects.images, device)
    anomal_maps, anomal_scores = score_images(model, cfg.method, val.anomalous, device)
    ceiling = DetectionCeiling.from_synthetic(defect_scores, defect_maps, defects.bool_masks())
    by_rate = calibrate("false_reject_rate", normal_scores, normal_maps, false_reject_rate=cfg.false_reject_rate,
                        ceiling=ceiling)
    by_f1 = calibrate("max_f1", normal_scores, normal_maps, anomal_scores, anomal_maps,
                      val.masks[:, 0].numpy() > 0.5)
    return {"default": "false_reject_rate", "false_reject_rate": by_rate.to_dict(), "max_f1": by_f1.to_dict()}

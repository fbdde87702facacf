"""Fitting the RADAR head to a trained denoiser, from the run's held-out good images only.

The selection split (its good images and their synthetic defects) chooses t_radar and the
discrepancy (on one tile of each image for a tiled model), and the one-class model is fitted on its
good images' features (whole frames); the calibration
split sets the thresholds, as for the norm-guided head. Nothing here sees a test image.
"""

import numpy as np
import torch

from protocols.one_class import KnnNormalModel, fit_knn
from trainer.data.training_set import SyntheticDefects, ValidationSet
from trainer.evaluation.calibration import DetectionCeiling, calibrate
from trainer.evaluation.metrics import image_auroc, pixel_ap
from trainer.fused import model_input
from trainer.method import MethodConfig
from trainer.model import DiffusionAD
from trainer.radar import DISCREPANCIES, T_CANDIDATES, RadarConstants, RadarInference, feature_window, image_features

BATCH = 16


@torch.no_grad()
def responses(head: RadarInference, images: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """Edge responses [N, H, W] of images in [-1, 1] for every discrepancy, one denoiser pass each."""
    chunks = [{name: r.cpu() for name, r in head.responses(chunk.to(device)).items()} for chunk in images.split(BATCH)]
    return {name: torch.cat([c[name] for c in chunks]) for name in chunks[0]}


def candidate_figures(normal: torch.Tensor, anomalous: torch.Tensor, masks: np.ndarray, window: int) -> dict:
    """Image AUROC of the one-class scores (good images scored leave-one-out) and pixel AP of the
    responses, normal vs synthetic; selection = their mean, as for the norm-guided head."""
    knn, own = fit_knn(image_features(normal, window).numpy())
    scores = np.r_[own, knn.score(image_features(anomalous, window).numpy())]
    labels = np.r_[np.zeros(len(normal), bool), np.ones(len(anomalous), bool)]
    maps = torch.cat([normal, anomalous]).numpy()
    pixel_labels = np.concatenate([np.zeros(normal.shape, bool), masks])
    i_auroc, p_ap = image_auroc(labels, scores), pixel_ap(pixel_labels, maps)
    return {"image_auroc": float(i_auroc), "pixel_ap": float(p_ap), "selection": float((i_auroc + p_ap) / 2)}


def choose_constants(model: DiffusionAD, method: MethodConfig, selection: ValidationSet,
                     device: torch.device) -> tuple[dict, list[dict]]:
    """The (t_radar, discrepancy) candidate with the best selection figure, and every candidate's
    figures. A tiled model's are measured on its selection tiles with the one-tile graph: the
    responses are per pixel, and six candidates over whole frames would cost n² passes each."""
    window = feature_window(model.image_size)
    masks = selection.masks[:, 0].numpy() > 0.5
    on_tiles = selection.normal.shape[-1] != model.frame_size
    scales = [t for t in T_CANDIDATES if t < method.tau]
    if not scales:
        raise ValueError(f"tau = {method.tau} leaves no RADAR noise scale: the candidates {T_CANDIDATES} must lie "
                         "in the small-noise range [0, tau) the denoiser was trained on")
    candidates = []
    for t in scales:
        constants = RadarConstants(t=t, discrepancy="residual", window=window, map_scale=1.0)
        head = model.radar(method, constants, on_tiles).to(device)
        normal, anomalous = responses(head, selection.normal, device), responses(head, selection.anomalous, device)
        for name in DISCREPANCIES:
            candidates.append({"t": t, "discrepancy": name,
                               **candidate_figures(normal[name], anomalous[name], masks, window)})
    return max(candidates, key=lambda c: c["selection"]), candidates


def fit_radar(model: DiffusionAD, method: MethodConfig, selection: ValidationSet, validation: ValidationSet,
              calibration: np.ndarray, defects: SyntheticDefects, false_reject_rate: float,
              device: torch.device) -> dict:
    """The run's RADAR head: constants, one-class model and thresholds, with how they were chosen.
    The constants are chosen on `selection` (a tiled model's tiles); the map scale, the one-class
    model and the head's figures come from `validation`'s whole frames. `calibration` is uint8 NHWC
    good images the model was neither trained nor selected on, `defects` synthetic ones made on
    them (the thresholds' detection ceiling)."""
    was_training = model.training
    model.eval()
    chosen, candidates = choose_constants(model, method, selection, device)
    # The window is in pixels at the networks' resolution, which tiling keeps.
    unscaled = RadarConstants(t=chosen["t"], discrepancy=chosen["discrepancy"], window=feature_window(model.image_size),
                              map_scale=1.0)
    head = model.radar(method, unscaled).to(device)
    normal = responses(head, validation.normal, device)[unscaled.discrepancy]
    anomalous = responses(head, validation.anomalous, device)[unscaled.discrepancy]
    on_frames = candidate_figures(normal, anomalous, validation.masks[:, 0].numpy() > 0.5, unscaled.window)
    # Scale: a good frame's typical highest response maps to 0.5.
    constants = unscaled.model_copy(update={"map_scale": max(float(normal.flatten(1).amax(dim=1).median()), 1e-6)})
    knn, _ = fit_knn(image_features(normal, constants.window).numpy())
    thresholds = radar_thresholds(model.radar(method, constants).to(device), knn, calibration, defects, validation,
                                  false_reject_rate, device)
    model.train(was_training)
    return {"constants": constants.model_dump(), "one_class": knn.model_dump(), "thresholds": thresholds,
            "validation": {"t": constants.t, "discrepancy": constants.discrepancy, **on_frames},
            "candidates_on_tiles": selection is not validation, "candidates": candidates}


@torch.no_grad()
def radar_outputs(head: RadarInference, images: torch.Tensor, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs → (anomaly maps [N, H, W], features [N, 2])."""
    outputs = [head.score(chunk.to(device)) for chunk in images.split(BATCH)]
    return (torch.cat([m.cpu() for m, _ in outputs]).numpy(), torch.cat([f.cpu() for _, f in outputs]).numpy())


def radar_thresholds(head: RadarInference, knn: KnnNormalModel, calibration: np.ndarray, defects: SyntheticDefects,
                     val: ValidationSet, false_reject_rate: float, device: torch.device) -> dict:
    """The head's thresholds under both policies, as `validation.calibrate_run` sets the norm-guided
    head's: the default capped by what catches the synthetic `defects`."""
    calibration_maps, calibration_features = radar_outputs(
        head, model_input(torch.from_numpy(calibration), head.channels), device)
    defect_maps, defect_features = radar_outputs(head, defects.images, device)
    anomalous_maps, anomalous_features = radar_outputs(head, val.anomalous, device)
    ceiling = DetectionCeiling.from_synthetic(knn.score(defect_features), defect_maps, defects.bool_masks())
    by_rate = calibrate("false_reject_rate", knn.score(calibration_features), calibration_maps,
                        false_reject_rate=false_reject_rate, ceiling=ceiling)
    by_f1 = calibrate("max_f1", knn.score(calibration_features), calibration_maps, knn.score(anomalous_features),
                      anomalous_maps, val.masks[:, 0].numpy() > 0.5)
    return {"default": "false_reject_rate", "false_reject_rate": by_rate.to_dict(), "max_f1": by_f1.to_dict()}


def load_radar(record: dict, model: DiffusionAD, method: MethodConfig) -> tuple[RadarInference, KnnNormalModel]:
    """A run's RADAR head from its radar.json record: the graph over the model's denoiser and the
    one-class model that scores the graph's features."""
    constants = RadarConstants.model_validate(record["constants"])
    return (model.radar(method, constants).eval(),
            KnnNormalModel.model_validate(record["one_class"]))

"""`trainer eval`: the field's metrics on a labelled test folder, and a picture report."""

from pathlib import Path

import numpy as np
import torch

from trainer import run_dir as files
from trainer.config import ConfigError, TrainConfig
from trainer.data.mvtec import read_mask, read_rgb, scan_mvtec
from trainer.evaluation.metrics import compute_metrics, resize_for_metrics, verdict_metrics
from trainer.evaluation.report import write_curves, write_sample_grid, write_score_histogram
from trainer.fused import uint8_nhwc_to_unit_range
from trainer.model import DiffusionAD
from trainer.profiles import get_profile

METRIC_SIZE = 256  # the field reports metrics at 256²


def load_run(run: Path) -> tuple[TrainConfig, DiffusionAD, dict]:
    """The run's config, selected weights and thresholds; a clear error if the run is incomplete."""
    for name in (files.CONFIG, files.WEIGHTS, files.THRESHOLDS):
        if not (run / name).is_file():
            raise ConfigError(f"{run}: not a finished training run (missing {name})")
    cfg = TrainConfig.model_validate(files.read_json(run / files.CONFIG)["train"])
    model = DiffusionAD(get_profile(cfg.profile))
    files.load_weights(run / files.WEIGHTS, model)
    return cfg, model.eval(), files.read_json(run / files.THRESHOLDS)


@torch.no_grad()
def score_in_batches(graph, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NHWC images through a fused graph (module or exported program) → (maps, scores)."""
    outputs = [graph(torch.from_numpy(chunk)) for chunk in np.array_split(images, -(-len(images) // batch_size))]
    return torch.cat([m for m, _ in outputs]).numpy(), torch.cat([s for _, s in outputs]).numpy()


@torch.no_grad()
def evaluate(run: Path, data_dir: Path, out: Path, batch_size: int = 8, report_samples: int = 8) -> dict:
    cfg, model, thresholds = load_run(run)
    folder = scan_mvtec(data_dir, require_test=True)
    size = model.image_size
    images = np.stack([read_rgb(s.image, size) for s in folder.test])
    masks = np.stack([read_mask(s.mask, METRIC_SIZE) if s.mask else np.zeros((METRIC_SIZE,) * 2, bool)
                      for s in folder.test])
    labels = np.array([s.defect != "good" for s in folder.test])
    defects = [s.defect for s in folder.test]

    fused = model.fused(cfg.method).eval()
    maps, scores = score_in_batches(fused, images, batch_size)

    maps_256 = resize_for_metrics(maps, METRIC_SIZE)
    metrics = compute_metrics(labels, scores, masks, maps_256, defects)
    policy = thresholds["default"]
    image_threshold = thresholds[policy]["image"]
    # what the station would have said with the thresholds that ship in the bundle
    metrics["verdicts"] = {"policy": policy, "image_threshold": image_threshold,
                           **verdict_metrics(labels, scores >= image_threshold, defects)}
    metrics["run"] = {"profile": cfg.profile, "data": str(data_dir.resolve()), "images": len(images)}

    out.mkdir(parents=True, exist_ok=True)
    picks = np.unique(np.linspace(0, len(images) - 1, min(report_samples, len(images))).round().astype(int))
    x0 = uint8_nhwc_to_unit_range(torch.from_numpy(images[picks]))
    recon = ((fused.reconstruct(x0) + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    mask_small = resize_for_metrics(masks[picks], size)
    titles = [f"{folder.test[i].defect}/{folder.test[i].image.name}  score {scores[i]:.3f}" for i in picks]
    write_sample_grid(out / "samples.png", images[picks], recon, maps[picks], mask_small, titles)
    write_curves(out, labels, scores, masks, maps_256)
    write_score_histogram(out / "score_histogram.png", labels, scores, metrics["verdicts"])
    files.write_json(out / "metrics.json", metrics)
    return metrics

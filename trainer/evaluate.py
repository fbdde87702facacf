"""`trainer eval`: the field's metrics on a labelled test folder, and a picture report."""

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from trainer import run_dir as files
from trainer.config import ConfigError, TrainConfig
from trainer.data.color import CHANNELS
from trainer.data.mvtec import read_mask, read_rgb, scan_mvtec
from trainer.evaluation.metrics import compute_metrics, resize_for_metrics, verdict_metrics
from trainer.evaluation.report import write_curves, write_sample_grid, write_score_histogram
from trainer.fused import model_input, unit_range_to_uint8_nhwc
from trainer.model import DiffusionAD
from trainer.profiles import get_profile
from trainer.radar_fit import fit_radar, load_radar

if TYPE_CHECKING:
    from trainer.training import PreparedData

METRIC_SIZE = 256  # the field reports metrics at 256²


def load_run(run: Path) -> tuple[TrainConfig, DiffusionAD, dict]:
    """The run's config, selected weights and thresholds; a clear error if the run is incomplete."""
    for name in (files.CONFIG, files.WEIGHTS, files.THRESHOLDS):
        if not (run / name).is_file():
            raise ConfigError(f"{run}: not a finished training run (missing {name})")
    config = files.read_json(run / files.CONFIG)
    cfg = TrainConfig.model_validate(config["train"])
    # Runs from before gray models were RGB.
    model = DiffusionAD(get_profile(cfg.profile), CHANNELS[config["data"].get("color", {"mode": "rgb"})["mode"]],
                        cfg.tiles_per_side)
    files.load_weights(run / files.WEIGHTS, model)
    return cfg, model.eval(), files.read_json(run / files.THRESHOLDS)


@torch.no_grad()
def score_in_batches(graph, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NHWC images through a fused graph (module or exported program) → (maps, scores)."""
    outputs = [graph(torch.from_numpy(chunk)) for chunk in np.array_split(images, -(-len(images) // batch_size))]
    return torch.cat([m for m, _ in outputs]).numpy(), torch.cat([s for _, s in outputs]).numpy()


def held_out_data(run: Path, cfg: TrainConfig) -> "PreparedData":
    """The run's data split again (it is seeded), checked against the names config.json recorded:
    its selection and calibration images, for fitting or calibrating after the run."""
    from trainer.training import prepare_data

    recorded = files.read_json(run / files.CONFIG)["data"]
    data = prepare_data(Path(recorded["path"]), cfg)
    if [p.name for p in data.split.calibration] != recorded.get("calibration_images"):
        raise ConfigError(f"{run}: the training data changed since the run (its calibration split differs); "
                          "cannot use the run's held-out images")
    return data


def radar_record(run: Path, cfg: TrainConfig, model: DiffusionAD) -> dict:
    """The run's RADAR head; a run trained before the head existed gets it fitted now, from its own
    held-out images."""
    path = run / files.RADAR
    if path.is_file():
        return files.read_json(path)
    data = held_out_data(run, cfg)
    print(f"{run}: fitting the RADAR head on the run's held-out images (trained before the head existed)")
    record = fit_radar(model, cfg.method, data.selection, data.validation, data.calibration, data.calibration_defects,
                       cfg.false_reject_rate, torch.device("cpu"))
    files.write_json(path, record)
    return record


def head_metrics(labels: np.ndarray, scores: np.ndarray, masks: np.ndarray, maps: np.ndarray,
                 defects: list[str], thresholds: dict) -> dict:
    """The field's metrics and, at the head's shipped threshold, the station's verdict figures."""
    metrics = compute_metrics(labels, scores, masks, resize_for_metrics(maps, METRIC_SIZE), defects)
    policy = thresholds["default"]
    shipped = thresholds[policy]
    metrics["verdicts"] = {"policy": policy, "image_threshold": shipped["image"],
                           "stated_false_reject_rate": shipped.get("expected_false_reject_rate"),
                           "limited_by": shipped.get("limited_by"),
                           **verdict_metrics(labels, scores >= shipped["image"], defects)}
    return metrics


@dataclass(frozen=True)
class TestSet:
    """A labelled test folder: images at the model's frame size, masks at the metrics' size."""

    names: list[str]  # defect/file
    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    defects: list[str]


def read_test_set(data_dir: Path, size: int) -> TestSet:
    test = scan_mvtec(data_dir, require_test=True).test
    return TestSet(names=[f"{s.defect}/{s.image.name}" for s in test],
                   images=np.stack([read_rgb(s.image, size) for s in test]),
                   masks=np.stack([read_mask(s.mask, METRIC_SIZE) if s.mask else np.zeros((METRIC_SIZE,) * 2, bool)
                                   for s in test]),
                   labels=np.array([s.defect != "good" for s in test]),
                   defects=[s.defect for s in test])


@torch.no_grad()
def both_heads(cfg: TrainConfig, model: DiffusionAD, thresholds: dict, radar: dict, test: TestSet,
               batch_size: int = 8) -> tuple[dict, dict]:
    """The norm-guided head's metrics at the top level of the result, the RADAR head's under
    "radar"; and each head's (maps, scores)."""
    maps, scores = score_in_batches(model.fused(cfg.method).eval(), test.images, batch_size)
    radar_head, one_class = load_radar(radar, model, cfg.method)
    radar_maps, radar_features = score_in_batches(radar_head, test.images, batch_size)
    radar_scores = one_class.score(radar_features)
    metrics = head_metrics(test.labels, scores, test.masks, maps, test.defects, thresholds)
    metrics["radar"] = {**head_metrics(test.labels, radar_scores, test.masks, radar_maps, test.defects,
                                       radar["thresholds"]),
                        "constants": radar_head.constants.model_dump()}
    return metrics, {"norm-guided": (maps, scores), "radar": (radar_maps, radar_scores)}


def by_head(metrics: dict) -> dict[str, dict]:
    """`both_heads`' metrics per head name (metrics.json keeps the norm-guided head's at the top level)."""
    return {"norm-guided": metrics, "radar": metrics["radar"]}


@torch.no_grad()
def evaluate(run: Path, data_dir: Path, out: Path, batch_size: int = 8, report_samples: int = 8) -> dict:
    """Both heads on the test set (`both_heads`), written to metrics.json with a picture report."""
    cfg, model, thresholds = load_run(run)
    radar = radar_record(run, cfg, model)
    test = read_test_set(data_dir, model.frame_size)
    metrics, outputs = both_heads(cfg, model, thresholds, radar, test, batch_size)
    (maps, scores), (radar_maps, radar_scores) = outputs["norm-guided"], outputs["radar"]
    metrics["run"] = {"profile": cfg.profile, "data": str(data_dir.resolve()), "images": len(test.images)}

    out.mkdir(parents=True, exist_ok=True)
    images = test.images
    picks = np.unique(np.linspace(0, len(images) - 1, min(report_samples, len(images))).round().astype(int))
    fused = model.fused(cfg.method).eval()
    recon = unit_range_to_uint8_nhwc(fused.reconstruct(model_input(torch.from_numpy(images[picks]), model.channels)))
    mask_small = resize_for_metrics(test.masks[picks], model.frame_size)
    titles = [f"{test.names[i]}  score {scores[i]:.3f}  RADAR {radar_scores[i]:.3f}" for i in picks]
    write_sample_grid(out / "samples.png", images[picks], recon, maps[picks], radar_maps[picks], mask_small, titles)
    write_curves(out, test.labels, scores, test.masks, resize_for_metrics(maps, METRIC_SIZE))
    write_score_histogram(out / "score_histogram.png", test.labels, scores, metrics["verdicts"])
    write_score_histogram(out / "radar_score_histogram.png", test.labels, radar_scores, metrics["radar"]["verdicts"])
    files.write_json(out / "metrics.json", metrics)
    return metrics

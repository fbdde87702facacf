"""`trainer calibrate`: new thresholds from good parts taken on the line (the first good parts of
a shift, a station's saved frames), for a training run or a bundle; or, for a run, from its own
calibration split again. Thresholds live outside the
graphs, so nothing is recompiled: every head is recalibrated; a run gets a new thresholds.json (and
radar.json thresholds; export it again), a bundle a new copy with a new manifest (sign it, deploy
it; the station reloads)."""

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from protocols.bundle import (
    MANIFEST_DIGEST_NAME, MANIFEST_NAME, Manifest, RadarSpec, ThresholdSpec, sha256_file,
)
from protocols.one_class import KnnNormalModel
from trainer import run_dir as files
from trainer.config import ConfigError, TrainConfig
from trainer.data.mvtec import DataError, is_image_file, read_rgb
from trainer.evaluate import held_out_data, load_run, score_in_batches
from trainer.evaluation.calibration import Thresholds, calibrate
from trainer.model import DiffusionAD
from trainer.radar_fit import load_radar, radar_thresholds
from trainer.validation import calibrate_run

BATCH = 8


@dataclass(frozen=True)
class Recalibration:
    head: str
    before: Thresholds
    after: Thresholds
    good_rejected_before: float  # share of the given good images the old image threshold fails
    escapes: tuple[float, float] | None  # (before, after) share of the given defective images passed


@dataclass(frozen=True)
class _Head:
    """One head of a run or a bundle, as far as calibration needs it."""
    name: str
    graph: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # uint8 NHWC → (maps, second output)
    one_class: KnnNormalModel | None  # RADAR: its second output are features, scored by this
    before: Thresholds
    batch: int  # a bundle's programs take at most its max_batch

    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, second = score_in_batches(self.graph, images, self.batch)
        return maps, second if self.one_class is None else self.one_class.score(second)


def _images(folder: Path, size: int) -> np.ndarray:
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    paths = sorted(p for p in folder.rglob("*") if is_image_file(p))
    if not paths:
        raise DataError(f"{folder}: no images")
    return np.stack([read_rgb(p, size) for p in paths])


def _bundle_heads(bundle: Path) -> tuple[int, list[_Head]]:
    manifest = _manifest(bundle)
    heads = []
    for head in manifest.heads:
        program = next((f for f in head.files if f.format == "torch.export"), None)
        if program is None:
            raise ConfigError(f"{bundle}: the bundle's {head.name} head has no torch.export program to score "
                              "images with")
        try:
            module = torch.export.load(bundle / program.path).module()
        except Exception as err:  # torch raises many kinds for a file that is not a program
            raise ConfigError(f"{bundle / program.path}: cannot be loaded ({type(err).__name__})") from None
        one_class = head.method.one_class if isinstance(head.method, RadarSpec) else None
        heads.append(_Head(head.name, module, one_class, Thresholds.from_dict(head.thresholds.model_dump()),
                           min(BATCH, manifest.input.max_batch)))
    return manifest.input.height, heads


def _run_heads(run: Path) -> tuple[TrainConfig, DiffusionAD, list[_Head]]:
    cfg, model, thresholds = load_run(run)
    heads = [_Head("norm-guided", model.fused(cfg.method).eval(), None,
                   Thresholds.from_dict(thresholds["false_reject_rate"]), BATCH)]
    if (run / files.RADAR).is_file():
        record = files.read_json(run / files.RADAR)
        graph, one_class = load_radar(record, model, cfg.method)
        heads.append(_Head("radar", graph, one_class, Thresholds.from_dict(record["thresholds"]["false_reject_rate"]), BATCH))
    return cfg, model, heads


def recalibrate(source: Path, good_dir: Path | None, defects_dir: Path | None, false_reject_rate: float,
                out: Path | None) -> list[Recalibration]:
    """Thresholds of every head from the good images in `good_dir` (recursively), written into
    the run at `source`, or into a copy of the bundle at `source` made at `out`. Without `good_dir`,
    a run's own calibration split sets them again, as `fit` did (after a change of target rate, or
    of the calibration code)."""
    is_bundle = (source / MANIFEST_NAME).is_file()
    if is_bundle and out is None:
        raise ConfigError(f"{source} is a bundle: give --out for the recalibrated copy (a bundle is never changed "
                          "in place: its signature and the stations' copies refer to it)")
    if is_bundle and good_dir is None:
        raise ConfigError(f"{source} is a bundle: give GOOD_DIR (a bundle does not carry the images it was "
                          "calibrated on)")
    if out is not None and out.exists():
        raise ConfigError(f"{out}: exists; not overwriting")
    if is_bundle:
        size, heads = _bundle_heads(source)
    else:
        cfg, model, heads = _run_heads(source)
        size = model.frame_size
    if good_dir is None:  # a run (a bundle without GOOD_DIR was refused above)
        good, on_split = _own_split_thresholds(source, cfg, model, heads, false_reject_rate)
    else:
        good, on_split = _images(good_dir, size), None
    defects = _images(defects_dir, size) if defects_dir is not None else None
    done = []
    for head in heads:
        good_maps, good_scores = head.score(good)
        if on_split is not None:
            after = Thresholds.from_dict(on_split[head.name]["false_reject_rate"])
        else:
            after = calibrate("false_reject_rate", good_scores, good_maps, false_reject_rate=false_reject_rate,
                              ceiling=head.before.ceiling())
        escapes = None
        if defects is not None:
            _, defect_scores = head.score(defects)
            escapes = (float(np.mean(defect_scores < head.before.image)), float(np.mean(defect_scores < after.image)))
        done.append(Recalibration(head.name, head.before, after, float(np.mean(good_scores >= head.before.image)),
                                  escapes))
    if is_bundle:
        _write_bundle(source, out, {r.head: r.after for r in done})
    elif on_split is not None:
        files.write_json(source / files.THRESHOLDS, on_split["norm-guided"])
        if "radar" in on_split:
            record = files.read_json(source / files.RADAR)
            files.write_json(source / files.RADAR, {**record, "thresholds": on_split["radar"]})
    else:
        for recalibration in done:
            calibrated = {"default": "false_reject_rate", "false_reject_rate": recalibration.after.to_dict(),
                          "calibrated_on": str(good_dir.resolve())}
            if recalibration.head == "radar":
                record = files.read_json(source / files.RADAR)
                files.write_json(source / files.RADAR, {**record, "thresholds": {**record["thresholds"], **calibrated}})
            else:
                files.write_json(source / files.THRESHOLDS, {**files.read_json(source / files.THRESHOLDS), **calibrated})
    return done


def _own_split_thresholds(run: Path, cfg: TrainConfig, model: DiffusionAD, heads: list[_Head],
                          false_reject_rate: float) -> tuple[np.ndarray, dict[str, dict]]:
    """The run's calibration images and, per head, the thresholds `fit` would write for them now."""
    cfg = cfg.model_copy(update={"false_reject_rate": false_reject_rate})
    data = held_out_data(run, cfg)
    device = torch.device("cpu")
    thresholds = {}
    for head in heads:
        if head.one_class is None:
            thresholds[head.name] = calibrate_run(model, cfg, data.calibration, data.calibration_defects,
                                                  data.validation, device)
        else:
            thresholds[head.name] = radar_thresholds(head.graph, head.one_class, data.calibration,
                                                     data.calibration_defects, data.validation, false_reject_rate,
                                                     device)
    return data.calibration, thresholds


def _manifest(bundle: Path) -> Manifest:
    try:
        return Manifest.model_validate_json((bundle / MANIFEST_NAME).read_bytes())
    except ValidationError as err:
        first = err.errors()[0]
        raise ConfigError(f"{bundle / MANIFEST_NAME}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def _write_bundle(source: Path, out: Path, thresholds: dict[str, Thresholds]) -> None:
    """A copy of the bundle with each head's new thresholds, its digest last; unsigned (`trainer sign`)."""
    manifest = _manifest(source)
    heads = [h.model_copy(update={"thresholds": ThresholdSpec.model_validate(thresholds[h.name].to_dict())})
             for h in manifest.heads]
    updated = manifest.model_copy(update={"heads": heads})
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for entry in manifest.files:
            shutil.copy2(source / entry.path, staging / entry.path)
            if sha256_file(staging / entry.path) != entry.sha256:
                raise ConfigError(f"{source / entry.path}: sha256 does not match the manifest; not copying it")
        (staging / MANIFEST_NAME).write_text(updated.model_dump_json(indent=2) + "\n")
        (staging / MANIFEST_DIGEST_NAME).write_text(sha256_file(staging / MANIFEST_NAME) + "\n")
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

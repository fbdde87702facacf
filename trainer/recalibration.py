"""`trainer calibrate`: new thresholds from good parts taken on the line (the first good parts of
a shift, a station's saved frames), for a training run or a bundle. Thresholds live outside the
graphs, so nothing is recompiled: a run gets a new thresholds.json (export it again), a bundle a
new copy with a new manifest (sign it, deploy it; the station reloads)."""

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from protocols.bundle import BUNDLE_VERSION, MANIFEST_DIGEST_NAME, MANIFEST_NAME, Manifest, ThresholdSpec, sha256_file
from trainer import run_dir as files
from trainer.config import ConfigError
from trainer.data.mvtec import DataError, is_image_file, read_rgb
from trainer.evaluate import load_run, score_in_batches
from trainer.evaluation.calibration import Thresholds, calibrate

BATCH = 8


@dataclass(frozen=True)
class Recalibration:
    before: Thresholds
    after: Thresholds
    good_rejected_before: float  # share of the given good images the old image threshold fails
    escapes: tuple[float, float] | None  # (before, after) share of the given defective images passed


def _images(folder: Path, size: int) -> np.ndarray:
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    paths = sorted(p for p in folder.rglob("*") if is_image_file(p))
    if not paths:
        raise DataError(f"{folder}: no images")
    return np.stack([read_rgb(p, size) for p in paths])


def _scorer(source: Path):
    """(image size, uint8 NHWC → (maps, scores)) for a run or a bundle, and the thresholds it ships."""
    if (source / MANIFEST_NAME).is_file():
        manifest = _manifest(source)
        program = next((f for f in manifest.files if f.format == "torch.export"), None)
        if program is None:
            raise ConfigError(f"{source}: the bundle has no torch.export program to score images with")
        try:
            module = torch.export.load(source / program.path).module()
        except Exception as err:  # torch raises many kinds for a file that is not a program
            raise ConfigError(f"{source / program.path}: cannot be loaded ({type(err).__name__})") from None
        return manifest.input.height, module, Thresholds.from_dict(manifest.thresholds.model_dump())
    cfg, model, thresholds = load_run(source)
    return model.image_size, model.fused(cfg.method).eval(), Thresholds.from_dict(thresholds["false_reject_rate"])


def recalibrate(source: Path, good_dir: Path, defects_dir: Path | None, false_reject_rate: float,
                out: Path | None) -> Recalibration:
    """Thresholds from the good images in `good_dir` (recursively), written into the run at
    `source`, or into a copy of the bundle at `source` made at `out`."""
    is_bundle = (source / MANIFEST_NAME).is_file()
    if is_bundle and out is None:
        raise ConfigError(f"{source} is a bundle: give --out for the recalibrated copy (a bundle is never changed "
                          "in place: its signature and the stations' copies refer to it)")
    if out is not None and out.exists():
        raise ConfigError(f"{out}: exists; not overwriting")
    size, module, before = _scorer(source)
    good_maps, good_scores = score_in_batches(module, _images(good_dir, size), BATCH)
    after = calibrate("false_reject_rate", good_scores, good_maps, false_reject_rate=false_reject_rate)
    escapes = None
    if defects_dir is not None:
        _, defect_scores = score_in_batches(module, _images(defects_dir, size), BATCH)
        escapes = (float(np.mean(defect_scores < before.image)), float(np.mean(defect_scores < after.image)))
    if is_bundle:
        _write_bundle(source, out, after)
    else:
        thresholds = files.read_json(source / files.THRESHOLDS)
        files.write_json(source / files.THRESHOLDS, {**thresholds, "default": "false_reject_rate",
                                                     "false_reject_rate": after.to_dict(),
                                                     "calibrated_on": str(good_dir.resolve())})
    return Recalibration(before, after, float(np.mean(good_scores >= before.image)), escapes)


def _manifest(bundle: Path) -> Manifest:
    try:
        return Manifest.model_validate_json((bundle / MANIFEST_NAME).read_bytes())
    except ValidationError as err:
        first = err.errors()[0]
        raise ConfigError(f"{bundle / MANIFEST_NAME}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def _write_bundle(source: Path, out: Path, thresholds: Thresholds) -> None:
    """A copy of the bundle with the new thresholds, its digest last; unsigned (`trainer sign`)."""
    manifest = _manifest(source)
    updated = manifest.model_copy(update={"thresholds": ThresholdSpec.model_validate(thresholds.to_dict()),
                                          "version": BUNDLE_VERSION})
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

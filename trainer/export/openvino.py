"""A head's OpenVINO IR files: fp32; INT8 by NNCF post-training quantisation; bf16, the fp32
graph computed at OpenVINO's bf16 inference precision.

All are converted from the head's torch.export program, so they compute the bundle's graph:
uint8 [B, H, W, 3] in, B from 1 to the bundle's max_batch. The fp32 IR must match the program
(export refuses otherwise). The INT8 IR is calibrated on the selection split only. A
reduced-precision file ships only if it decides like the fp32 program on the run's held-out
images (the selection split's good images and synthetic defects, and the calibration images;
never the test set)."""

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nncf
import numpy as np
import openvino as ov
import torch

from edge.runtime.cpu_features import station_cpu_features
from edge.runtime.openvino import compile_cpu, shared_core
from protocols.bundle import BundleFile, InputSpec, ParitySpec, Precision, sha256_file
from trainer import run_dir as files
from trainer.config import ConfigError, TrainConfig
from trainer.data.mvtec import DataError
from trainer.evaluate import score_in_batches
from trainer.evaluation.metrics import image_auroc
from trainer.fused import unit_range_to_uint8_nhwc
from trainer.training import prepare_data

# Verdicts are what the line acts on: a reduced-precision file may change at most 1 in 200 (with
# fewer held-out images than 200, none).
MIN_VERDICT_AGREEMENT = 0.995
# Ranking good against defective parts is what no threshold can repair afterwards: at most half a
# point of image AUROC (good vs synthetic) may be lost.
MAX_IMAGE_AUROC_DROP = 0.5
# The fp32 IR runs the program's arithmetic in another order: maps and scores in [0, 1] may differ
# by rounding (FP32_ATOL), RADAR's features, norms in the tens, by rounding relative to their size.
FP32_ATOL = 1e-4
FP32_RTOL = 1e-5
# OpenVINO computes bf16 on CPUs with AVX-512 BF16 (AMX implies it). Elsewhere it would quietly
# compute fp32, which the file's parity does not describe: such a station never loads it.
BF16_CPU_FEATURES = ["avx512_bf16"]

ImageScores = Callable[[np.ndarray], np.ndarray]  # a graph's second output → the head's image scores


@dataclass(frozen=True)
class HeldOut:
    """The run's held-out images, uint8 [N, H, W, 3]."""
    good: np.ndarray  # the selection split's good images
    synthetic: np.ndarray  # their synthetic defects
    calibration: np.ndarray  # the good images that set the thresholds

    @property
    def selection(self) -> np.ndarray:
        return np.concatenate([self.good, self.synthetic])

    @property
    def images(self) -> np.ndarray:
        """The selection split first, then the calibration images: the order `defective` labels."""
        return np.concatenate([self.selection, self.calibration])

    @property
    def defective(self) -> np.ndarray:
        return np.r_[np.zeros(len(self.good), bool), np.ones(len(self.synthetic), bool)]


def load_held_out(run: Path) -> HeldOut:
    """The run's held-out images, rebuilt from the data folder config.json records (the split is
    seeded); DataError if the folder is gone or its training images changed since the run."""
    config = files.read_json(run / files.CONFIG)
    recorded = config["data"]
    data = prepare_data(Path(recorded["path"]), TrainConfig.model_validate(config["train"]))
    if data.fingerprint != recorded["fingerprint"]:
        raise DataError(f"{recorded['path']}: the training images changed since the run")
    validation = data.validation
    return HeldOut(unit_range_to_uint8_nhwc(validation.normal), unit_range_to_uint8_nhwc(validation.anomalous),
                   data.calibration)


def to_openvino(program: torch.export.ExportedProgram, spec: InputSpec) -> ov.Model:
    """The program as an OpenVINO model; its input keeps the bundle's shape, batch 1..max_batch
    (conversion leaves every dimension open)."""
    model = ov.convert_model(program)
    model.reshape({model.input(0): ov.PartialShape([ov.Dimension(1, spec.max_batch), spec.height, spec.width, 3])})
    return model


def as_graph(compiled: ov.CompiledModel) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    """A compiled model called like the program: uint8 NHWC tensor in, its outputs as tensors."""
    return lambda images: tuple(torch.from_numpy(out) for out in compiled(images.numpy()).to_tuple())


def quantise(model: ov.Model, images: np.ndarray) -> ov.Model:
    """INT8 by NNCF's post-training quantisation, its statistics gathered one image at a time.

    Full bias correction, not NNCF's fast default: on a trained bottle model the default kept 91.7 %
    of the norm-guided verdicts (image AUROC -7.3 points), full correction all of them (+0.2)."""
    dataset = nncf.Dataset([image[None] for image in images])
    with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: stdout carries export's report
        return nncf.quantize(model, dataset, subset_size=len(images), fast_bias_correction=False)


def check_fp32(program: torch.export.ExportedProgram, compiled: ov.CompiledModel, spec: InputSpec, name: str) -> None:
    """ConfigError unless the fp32 model gives the program's outputs at the largest batch and at
    batch 1. Random images: conversion errors do not depend on what the pictures show."""
    images = torch.from_numpy(np.random.default_rng(0).integers(
        0, 256, (spec.max_batch, spec.height, spec.width, 3), dtype=np.uint8))
    converted, reference = as_graph(compiled), program.module()
    with torch.no_grad():
        for batch in (images, images[:1]):
            for got, want in zip(converted(batch), reference(batch)):
                excess = (got - want).abs() - FP32_RTOL * want.abs()
                if not excess.max() <= FP32_ATOL:  # a NaN fails too
                    raise ConfigError(f"{name}: the OpenVINO conversion does not compute the program: outputs differ "
                                      f"by up to {(got - want).abs().max():.3g} at batch {len(batch)}; refusing to "
                                      "ship it")


def measure_parity(fp32: np.ndarray, reduced: np.ndarray, defective: np.ndarray, threshold: float) -> ParitySpec:
    """A reduced-precision file's scores (finite) against the fp32 program's, on the same images.
    The first len(defective) images are the selection split (True: a synthetic defect), the image
    AUROC pair; the rest (the calibration images) count for verdicts and score deltas only."""
    pair = slice(0, len(defective))
    auroc_delta = image_auroc(defective, reduced[pair]) - image_auroc(defective, fp32[pair])
    return ParitySpec(images=len(fp32), verdict_agreement=float(np.mean((fp32 >= threshold) == (reduced >= threshold))),
                      max_abs_score_delta=float(np.abs(reduced - fp32).max()),
                      image_auroc_delta=float(100 * auroc_delta), min_verdict_agreement=MIN_VERDICT_AGREEMENT,
                      max_image_auroc_drop=MAX_IMAGE_AUROC_DROP)


def parity_failure(parity: ParitySpec) -> str | None:
    """The limits the file misses; None if it is within both."""
    missed = []
    if not parity.verdict_agreement >= parity.min_verdict_agreement:
        missed.append(f"verdict agreement below {parity.min_verdict_agreement}")
    if not -parity.image_auroc_delta <= parity.max_image_auroc_drop:
        missed.append(f"image AUROC drop over {parity.max_image_auroc_drop} points")
    return " and ".join(missed) or None


def _write(model: ov.Model, xml: Path, precision: Precision) -> None:
    """The IR: its graph, and its weights beside it in <name>.bin."""
    # A bf16 file computes in bf16 whatever its stored weights: fp16 storage halves it.
    ov.save_model(model, xml, compress_to_fp16=precision == "bf16")


def _listed(xml: Path, precision: Precision, cpu_features: list[str], parity: ParitySpec | None) -> list[BundleFile]:
    return [BundleFile(path=path.name, format=kind, target="cpu", sha256=sha256_file(path), precision=precision,
                       cpu_features=cpu_features, parity=parity)
            for path, kind in ((xml, "openvino-ir"), (xml.with_suffix(".bin"), "openvino-weights"))]


def _parity_of_file(xml: Path, precision: Precision, held_out: HeldOut, image_scores: ImageScores,
                    fp32_scores: np.ndarray, threshold: float, max_batch: int) -> ParitySpec | str:
    """The saved file, compiled as a station compiles it, against the fp32 program's scores: its
    parity, or why it may not ship."""
    compiled = compile_cpu(shared_core().read_model(xml), precision)
    scores = image_scores(score_in_batches(as_graph(compiled), held_out.images, max_batch)[1])
    if not np.isfinite(scores).all():
        return "it scores held-out images NaN or infinite"
    parity = measure_parity(fp32_scores, scores, held_out.defective, threshold)
    if failure := parity_failure(parity):
        return (f"{failure} (verdict agreement {parity.verdict_agreement:.4f}, image AUROC "
                f"{parity.image_auroc_delta:+.2f} points, max |Δscore| {parity.max_abs_score_delta:.3g}, on "
                f"{parity.images} held-out images)")
    return parity


def openvino_files(program: torch.export.ExportedProgram, spec: InputSpec, staging: Path, stem: str, head: str,
                   image_scores: ImageScores, threshold: float, held_out: HeldOut | None) -> list[BundleFile]:
    """<stem>.ov.xml/.bin (fp32) and, if `held_out` is given, the reduced-precision files
    <stem>.int8.ov.xml/.bin and (where this CPU computes bf16) <stem>.bf16.ov.xml/.bin, each kept
    only if, read back from disk, it passes parity at the head's image `threshold`; export says
    why it left one out."""
    model = to_openvino(program, spec)
    check_fp32(program, compile_cpu(model, "fp32"), spec, f"{stem}.ov.xml")
    xml = staging / f"{stem}.ov.xml"
    _write(model, xml, "fp32")
    entries = _listed(xml, "fp32", [], None)
    if held_out is None:
        return entries
    fp32_scores = image_scores(score_in_batches(program.module(), held_out.images, spec.max_batch)[1])
    reduced = {"int8": (quantise(model, held_out.selection), [])}
    if missing := sorted(set(BF16_CPU_FEATURES) - station_cpu_features()):
        print(f"{head} head: bf16 OpenVINO file not built: this CPU lacks {', '.join(missing)}, so its parity "
              "cannot be measured here")
    else:
        reduced["bf16"] = (model, BF16_CPU_FEATURES)
    for precision, (reduced_model, cpu_features) in reduced.items():
        xml = staging / f"{stem}.{precision}.ov.xml"
        _write(reduced_model, xml, precision)
        parity = _parity_of_file(xml, precision, held_out, image_scores, fp32_scores, threshold, spec.max_batch)
        if isinstance(parity, ParitySpec):
            entries += _listed(xml, precision, cpu_features, parity)
        else:
            print(f"{head} head: {precision} OpenVINO file not shipped: {parity}")
            xml.unlink()
            xml.with_suffix(".bin").unlink()
    return entries

"""`trainer export`: a training run → a self-describing, verifiable model bundle directory.

A bundle holds the run's heads (norm-guided; RADAR if the run has radar.json), each its own graph
over the same denoiser weights. Per head, always the portable torch.export program (runs on CPU and
CUDA; `portable` stops there); `cpu` adds an AOTInductor package and OpenVINO IR files, fp32,
INT8 and bf16, each below fp32 within its parity limits (the station times them all when it loads the bundle and runs the fastest); `tensorrt` adds
torch-tensorrt engines (built on the target GPU class); `all` both."""

import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from protocols.bundle import (
    MANIFEST_DIGEST_NAME, MANIFEST_NAME, BundleFile, HeadSpec, InputSpec, Manifest, MethodSpec, ModelIdentity,
    OutputSpec, Provenance, RadarOutputSpec, RadarSpec, ThresholdSpec, TilingSpec, sha256_file,
)
from protocols.signing import load_private_key
from trainer import run_dir as files
from trainer.config import ConfigError
from trainer.data.mvtec import DataError
from trainer.evaluate import load_run
from trainer.export.aoti import can_compile_here, compile_aoti_package
from trainer.export.openvino import HeldOut, load_held_out, openvino_files
from trainer.export.program import export_head
from trainer.export.signing import sign_bundle
from trainer.model import DiffusionAD
from trainer.radar import BLUR_KSIZE, SOBEL_KSIZE
from trainer.radar_fit import load_radar
from trainer.tiling import tile_stride

Target = Literal["portable", "cpu", "tensorrt", "all"]
HeadChoice = Literal["norm-guided", "radar", "both"]
# Each head's files are <stem>.pt2, <stem>.cpu.pt2, <stem>.ov.xml/.bin, <stem>.int8.ov.xml/.bin,
# <stem>.trt.ep; the norm-guided head keeps the names of version 2 bundles.
FILE_STEMS = {"norm-guided": "model", "radar": "radar"}
TEST_METRICS = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_f1_max")


@dataclass(frozen=True)
class _Head:
    name: str
    graph: torch.nn.Module
    method: MethodSpec | RadarSpec
    outputs: OutputSpec | RadarOutputSpec
    thresholds: dict  # {"default": policy, policy: thresholds}, as in thresholds.json
    validation: dict  # the selection split's figures: image_auroc, pixel_ap, selection
    test: dict | None  # `trainer eval`'s figures, if it ran

    def metrics(self) -> dict[str, float | None]:
        metrics = {f"validation_{k}": self.validation[k] for k in ("image_auroc", "pixel_ap", "selection")}
        if self.test is not None:
            metrics.update({k: self.test[k] for k in TEST_METRICS})
        return metrics

    @property
    def image_threshold(self) -> float:
        return self.thresholds[self.thresholds["default"]]["image"]

    def image_scores(self, second: np.ndarray) -> np.ndarray:
        """The graph's second output as image scores: RADAR's features go through its one-class model."""
        return self.method.one_class.score(second) if isinstance(self.method, RadarSpec) else second


def _run_heads(run: Path, choice: HeadChoice) -> tuple[DiffusionAD, list[_Head]]:
    """The model and the chosen heads the run has."""
    cfg, model, thresholds = load_run(run)
    if not (run / files.VALIDATION).is_file():
        raise ConfigError(f"{run}: not a finished training run (missing {files.VALIDATION})")
    evaluation = run / "eval" / "metrics.json"
    test = files.read_json(evaluation) if evaluation.is_file() else None
    heads = []
    if choice in ("norm-guided", "both"):
        heads.append(_Head("norm-guided", model.fused(cfg.method).eval(),
                           MethodSpec(profile=cfg.profile, **cfg.method.model_dump(exclude={"tau"})), OutputSpec(),
                           thresholds, files.read_json(run / files.VALIDATION), test))
    radar_path = run / files.RADAR
    if choice == "radar" and not radar_path.is_file():
        raise ConfigError(f"{radar_path}: missing: the run has no RADAR head (`trainer eval` fits one for a run "
                          "trained before the head existed)")
    if choice in ("radar", "both") and radar_path.is_file():
        record = files.read_json(radar_path)
        graph, one_class = load_radar(record, model, cfg.method)
        spec = RadarSpec(**graph.constants.model_dump(), blur_ksize=BLUR_KSIZE, sobel_ksize=SOBEL_KSIZE,
                         one_class=one_class)
        heads.append(_Head("radar", graph, spec, RadarOutputSpec(), record["thresholds"], record["validation"],
                           None if test is None else test.get("radar")))
    return model, heads


def export_bundle(run: Path, out: Path, target: Target = "cpu", max_batch: int = 8,
                  sign_key: Path | None = None, head: HeadChoice = "both") -> Manifest:
    """Build the bundle in a staging directory (signed with `sign_key` if given) and move it into
    place only when complete. `both` exports the heads the run has."""
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: bundle directory exists and is not empty")
    if sign_key is not None:
        load_private_key(sign_key)  # a bad key fails now, not after the compile
    if target in ("cpu", "all") and not can_compile_here():
        raise ConfigError(f"--target {target}: the CPU package is compiled for x86-64 stations, on an x86-64 machine; "
                          "export --target portable (or tensorrt) here")
    model, heads = _run_heads(run, head)
    size = model.frame_size
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        programs = {h.name: export_head(h.graph, size, max_batch) for h in heads}
        tiling = None if model.tiles_per_side == 1 else TilingSpec(
            tile=model.image_size, per_side=model.tiles_per_side, stride=tile_stride(model.image_size))
        spec = InputSpec(height=size, width=size, max_batch=max_batch, tiling=tiling)
        held_out = _held_out(run) if target in ("cpu", "all") else None
        manifest = Manifest(
            model=ModelIdentity(name=run.resolve().name,
                                version=datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")),
            input=spec,
            heads=[HeadSpec(name=h.name, files=_cpu_files(programs[h.name], staging, h, target, spec, held_out),
                            method=h.method, thresholds=ThresholdSpec.model_validate(
                                h.thresholds[h.thresholds["default"]]),
                            metrics=h.metrics(), outputs=h.outputs) for h in heads],
            recommended_head=max(heads, key=lambda h: h.validation["selection"]).name,
            provenance=Provenance(trainer_version=version("diffusionad-inspect"), torch_version=torch.__version__,
                                  data_fingerprint=files.read_json(run / files.CONFIG)["data"]["fingerprint"],
                                  created=datetime.now(timezone.utc)),
        )
        if target in ("tensorrt", "all"):
            manifest = _with_tensorrt(manifest, programs, staging)
        (staging / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n")
        (staging / MANIFEST_DIGEST_NAME).write_text(sha256_file(staging / MANIFEST_NAME) + "\n")
        if sign_key is not None:
            sign_bundle(staging, sign_key)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _held_out(run: Path) -> HeldOut | None:
    """The run's held-out images, which the reduced-precision files are calibrated and checked on;
    without them (the data folder gone or changed) the export goes on without those files and says
    why."""
    try:
        return load_held_out(run)
    except DataError as err:
        print(f"Reduced-precision OpenVINO files skipped: the run's held-out images are unavailable: {err}")
        return None


def _cpu_files(program: torch.export.ExportedProgram, staging: Path, head: _Head, target: Target, spec: InputSpec,
               held_out: HeldOut | None) -> list[BundleFile]:
    """The portable program, and for `cpu`/`all` the AOTInductor package and the OpenVINO files,
    kept beside it whatever their speed here: the station times them all at every batch size when
    it loads the bundle and runs the fastest on its own CPU."""
    stem = FILE_STEMS[head.name]
    path = staging / f"{stem}.pt2"
    torch.export.save(program, path)
    entries = [BundleFile(path=path.name, format="torch.export", target="cpu", sha256=sha256_file(path))]
    if target in ("cpu", "all"):
        package, cpu_features = compile_aoti_package(program, staging / f"{stem}.cpu.pt2")
        entries.append(BundleFile(path=package.name, format="aoti-package", target="cpu",
                                  sha256=sha256_file(package), cpu_features=cpu_features))
        entries += openvino_files(program, spec, staging, stem, head.name, head.image_scores, head.image_threshold,
                                  held_out)
    return entries


def _with_tensorrt(manifest: Manifest, programs: dict[str, torch.export.ExportedProgram], staging: Path) -> Manifest:
    """Every head's TensorRT file, each holding the manifest as it was before the TensorRT files."""
    from trainer.export.tensorrt import compile_tensorrt

    spec, inside = manifest.input, manifest.model_dump_json(indent=2)
    heads = []
    for head in manifest.heads:
        path = staging / f"{FILE_STEMS[head.name]}.trt.ep"
        compile_tensorrt(programs[head.name], spec.height, spec.width, spec.max_batch, path, inside)
        heads.append(head.model_copy(update={"files": [*head.files, BundleFile(
            path=path.name, format="torch-tensorrt", target="tensorrt", sha256=sha256_file(path))]}))
    return manifest.model_copy(update={"heads": heads})

"""`trainer export`: a training run → a self-describing, verifiable model bundle directory.

Always the portable torch.export program (runs on CPU and CUDA; `portable` stops there); `cpu`
adds an AOTInductor package (the station times both when it loads the bundle and runs the
faster); `tensorrt` adds torch-tensorrt engines (built on the target GPU class); `all` both."""

import shutil
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Literal

import torch

from protocols.bundle import (
    MANIFEST_DIGEST_NAME, MANIFEST_NAME, BundleFile, InputSpec, Manifest, MethodSpec, ModelIdentity, Provenance,
    ThresholdSpec, sha256_file,
)
from protocols.signing import load_private_key
from trainer import run_dir as files
from trainer.config import ConfigError
from trainer.evaluate import load_run
from trainer.export.aoti import compile_aoti_package
from trainer.export.program import export_fused
from trainer.export.signing import sign_bundle

Target = Literal["portable", "cpu", "tensorrt", "all"]
PROGRAM = "model.pt2"
AOTI_PACKAGE = "model.cpu.pt2"
TENSORRT_PROGRAM = "model.trt.ep"


def _metrics(run: Path) -> dict[str, float | None]:
    """Validation figures of the selected weights, and test figures if `trainer eval` wrote them."""
    metrics = {f"validation_{k}": v for k, v in files.read_json(run / files.VALIDATION).items()
               if k in ("image_auroc", "pixel_ap")}
    evaluation = run / "eval" / "metrics.json"
    if evaluation.is_file():
        test = files.read_json(evaluation)
        metrics.update({k: test[k] for k in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_f1_max")})
    return metrics


def export_bundle(run: Path, out: Path, target: Target = "cpu", max_batch: int = 8,
                  sign_key: Path | None = None) -> Manifest:
    """Build the bundle in a staging directory (signed with `sign_key` if given) and move it into
    place only when complete."""
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: bundle directory exists and is not empty")
    if sign_key is not None:
        load_private_key(sign_key)  # a bad key fails now, not after the compile
    cfg, model, thresholds = load_run(run)
    if not (run / files.VALIDATION).is_file():
        raise ConfigError(f"{run}: not a finished training run (missing {files.VALIDATION})")
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        fused = model.fused(cfg.method).eval()
        program = export_fused(fused, model.image_size, max_batch)
        torch.export.save(program, staging / PROGRAM)
        entries = [BundleFile(path=PROGRAM, format="torch.export", target="cpu", sha256=sha256_file(staging / PROGRAM))]
        if target in ("cpu", "all"):
            entries += _aoti_package(program, staging)
        manifest = Manifest(
            model=ModelIdentity(name=run.resolve().name,
                                version=datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")),
            input=InputSpec(height=model.image_size, width=model.image_size, max_batch=max_batch),
            method=MethodSpec(profile=cfg.profile, **cfg.method.model_dump(exclude={"tau"})),
            thresholds=ThresholdSpec.model_validate(thresholds[thresholds["default"]]),
            metrics=_metrics(run),
            provenance=Provenance(trainer_version=version("diffusionad-inspect"), torch_version=torch.__version__,
                                  data_fingerprint=files.read_json(run / files.CONFIG)["data"]["fingerprint"],
                                  created=datetime.now(timezone.utc)),
            files=entries,
        )
        if target in ("tensorrt", "all"):
            from trainer.export.tensorrt import compile_tensorrt

            compile_tensorrt(program, model.image_size, model.image_size, max_batch, staging / TENSORRT_PROGRAM,
                             manifest.model_dump_json(indent=2))
            manifest = manifest.model_copy(update={"files": [*entries, BundleFile(
                path=TENSORRT_PROGRAM, format="torch-tensorrt", target="tensorrt",
                sha256=sha256_file(staging / TENSORRT_PROGRAM))]})
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


def _aoti_package(program: torch.export.ExportedProgram, staging: Path) -> list[BundleFile]:
    """Kept beside the portable program whatever its speed here: the station times both at every
    batch size when it loads the bundle and runs the faster one on its own CPU."""
    path = compile_aoti_package(program, staging / AOTI_PACKAGE)
    return [BundleFile(path=AOTI_PACKAGE, format="aoti-package", target="cpu", sha256=sha256_file(path))]

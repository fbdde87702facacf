"""`trainer export`: a training run → a self-describing, verifiable model bundle directory.

Always the portable torch.export program (runs on CPU and CUDA; `portable` stops there); `cpu`
adds an AOTInductor package when it is faster here; `tensorrt` adds torch-tensorrt engines (built
on the target GPU class); `all` both."""

import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Literal

import torch

from protocols.bundle import (
    MANIFEST_DIGEST_NAME, MANIFEST_NAME, BundleFile, InputSpec, Manifest, MethodSpec, ModelIdentity, Provenance,
    ThresholdSpec, sha256_file,
)
from trainer import run_dir as files
from trainer.config import ConfigError
from trainer.evaluate import load_run
from trainer.export.program import export_fused

Target = Literal["portable", "cpu", "tensorrt", "all"]
PROGRAM = "model.pt2"
AOTI_PACKAGE = "model.cpu.pt2"
TENSORRT_PROGRAM = "model.trt.ep"
AOTI_MIN_SPEEDUP = 1.05


def images_per_second(run: Callable[[torch.Tensor], object], batch: torch.Tensor, repeats: int = 3) -> float:
    run(batch)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        run(batch)
    return repeats * batch.shape[0] / (time.perf_counter() - start)


def _metrics(run: Path) -> dict[str, float | None]:
    """Validation figures of the selected weights, and test figures if `trainer eval` wrote them."""
    metrics = {f"validation_{k}": v for k, v in files.read_json(run / files.VALIDATION).items()
               if k in ("image_auroc", "pixel_ap")}
    evaluation = run / "eval" / "metrics.json"
    if evaluation.is_file():
        test = files.read_json(evaluation)
        metrics.update({k: test[k] for k in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_f1_max")})
    return metrics


def export_bundle(run: Path, out: Path, target: Target = "cpu", max_batch: int = 8) -> Manifest:
    """Build the bundle in a staging directory and move it into place only when complete."""
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: bundle directory exists and is not empty")
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
            entries += _aoti_if_faster(program, staging, model.image_size, max_batch)
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
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _aoti_if_faster(program: torch.export.ExportedProgram, staging: Path, size: int, max_batch: int) -> list[BundleFile]:
    """Compile the AOTInductor package; keep it only if it clearly beats the exported program here
    (by more than the few-percent noise of a short timing on a shared machine)."""
    path = staging / AOTI_PACKAGE
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    compiled = torch._inductor.aoti_load_package(str(path))
    eager = program.module()
    batch = torch.randint(0, 256, (max_batch, size, size, 3), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        speedup = images_per_second(compiled, batch) / images_per_second(eager, batch)
    keep = speedup >= AOTI_MIN_SPEEDUP
    print(f"AOTInductor package: {speedup:.2f}× the exported program at batch {max_batch} on this CPU "
          f"({'kept' if keep else 'dropped'})")
    if not keep:
        path.unlink()
        return []
    return [BundleFile(path=AOTI_PACKAGE, format="aoti-package", target="cpu", sha256=sha256_file(path))]

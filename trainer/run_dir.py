"""What a training run leaves on disk, written atomically so an interrupted run never leaves a
half-written file. Nothing here unpickles arbitrary objects (weights_only / safetensors)."""

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG = "config.json"          # resolved TrainConfig + data provenance
WEIGHTS = "model.safetensors"   # the selected (best on validation) weights
CHECKPOINT = "checkpoint.pt"    # resumable state: weights, optimiser, step, RNG
THRESHOLDS = "thresholds.json"  # calibrated on the validation split
VALIDATION = "validation.json"  # validation figures of the selected weights
RADAR = "radar.json"            # the RADAR head: constants, one-class model, thresholds
LOG = "train_log.jsonl"         # one JSON line per logged step / validation


def _atomic_replace(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are ordinary shareable files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    _atomic_replace(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def append_log(run_dir: Path, record: dict) -> None:
    with open(run_dir / LOG, "a") as f:
        f.write(json.dumps(record) + "\n")


def save_weights(path: Path, model: nn.Module) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic_replace(path, lambda tmp: save_file(state, str(tmp)))


def load_weights(path: Path, model: nn.Module) -> None:
    model.load_state_dict(load_file(str(path)), strict=True)


def save_checkpoint(path: Path, state: dict) -> None:
    _atomic_replace(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)

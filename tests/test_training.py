"""`trainer fit` / `trainer eval` end to end on real data with the tiny profile."""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from trainer.cli import main
from trainer.objective import lr_factor
from trainer.training import TrainingSession

FAST_CONFIG = """
profile = "tiny"
batch_size = 4
val_every = 3
checkpoint_every = 2
num_workers = 0
"""


@pytest.fixture
def fast_config(tmp_path: Path) -> Path:
    path = tmp_path / "fast.toml"
    path.write_text(FAST_CONFIG)
    return path


def fit(data: Path, out: Path, config: Path, *extra: str) -> int:
    return main(["fit", str(data), "--out", str(out), "--config", str(config), *extra])


def test_lr_schedule_warms_up_then_decays_to_the_final_fraction():
    assert lr_factor(0.0, 0.1, 0.05) == 0.0
    assert lr_factor(0.05, 0.1, 0.05) == pytest.approx(0.5)
    assert lr_factor(0.1, 0.1, 0.05) == pytest.approx(1.0)
    assert lr_factor(1.0, 0.1, 0.05) == pytest.approx(0.05)
    values = [lr_factor(p / 100, 0.1, 0.05) for p in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:])), "decay must be monotone"


def checkpoint_weights(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


@pytest.mark.slow
def test_fit_is_reproducible_and_an_interrupted_run_resumes_exactly(tmp_path, datasets_dir, fast_config):
    data = datasets_dir / "hazelnut"
    assert fit(data, tmp_path / "straight", fast_config, "--max-steps", "12") == 0
    assert fit(data, tmp_path / "again", fast_config, "--max-steps", "12") == 0

    # Ctrl-C in the middle of step 6 (between periodic checkpoints), then --resume with no new bound.
    real_step = TrainingSession.train_step

    def interrupted_step(session, batch, lr_scale):
        if session.step == 5:
            raise KeyboardInterrupt
        return real_step(session, batch, lr_scale)

    split = tmp_path / "split"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TrainingSession, "train_step", interrupted_step)
        assert fit(data, split, fast_config, "--max-steps", "12") == 130
    assert torch.load(split / "checkpoint.pt", weights_only=True)["step"] == 5
    assert main(["fit", str(data), "--out", str(split), "--resume"]) == 0

    straight = checkpoint_weights(tmp_path / "straight")
    for run in ("again", "split"):
        other = checkpoint_weights(tmp_path / run)
        assert all(torch.equal(straight[k], other[k]) for k in straight), f"{run} differs from the straight run"

    run = tmp_path / "straight"
    thresholds = json.loads((run / "thresholds.json").read_text())
    assert thresholds["default"] == "false_reject_rate"
    assert thresholds["false_reject_rate"]["calibration_images"] > 0
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["validation"]["step"] for r in log if "validation" in r] == [3, 6, 9, 12]
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["validation_images"] >= 1 and len(config["data"]["fingerprint"]) == 64
    assert set(load_file(run / "model.safetensors")) == set(straight)


@pytest.mark.slow
def test_eval_writes_metrics_and_report(tmp_path, datasets_dir, fast_config):
    data = datasets_dir / "hazelnut"
    run, report = tmp_path / "run", tmp_path / "eval"
    assert fit(data, run, fast_config, "--max-steps", "3") == 0
    assert main(["eval", str(run), str(data), "--out", str(report)]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_f1_max"):
        assert 0 <= metrics[key] <= 1, key
    assert set(metrics["per_defect"]) == {"colour"}
    assert metrics["run"]["images"] == 23
    assert (report / "samples.png").stat().st_size > 10_000
    assert len(list(report.glob("*.png"))) >= 5


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tmp_path, datasets_dir, fast_config):
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "ddp"
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "trainer", "fit",
         str(datasets_dir / "hazelnut"), "--out", str(out), "--config", str(fast_config), "--max-steps", "3"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 3 and len(state["noise_rng"]) == 2
    assert (out / "model.safetensors").is_file() and (out / "thresholds.json").is_file()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", ["empty folder", "unknown config key", "missing data"])
def test_bad_input_is_one_clear_line_and_nothing_is_written(tmp_path, case):
    data, out, config = tmp_path / "data", tmp_path / "run", tmp_path / "c.toml"
    data.mkdir()
    config.write_text('profile = "tiny"\n')
    if case == "empty folder":
        (data / "train" / "good").mkdir(parents=True)
        expected = "train/good"
    elif case == "unknown config key":
        config.write_text('profile = "tiny"\nbatch_sise = 4\n')
        expected = "batch_sise: unknown key"
    else:
        data = tmp_path / "nowhere"
        expected = str(data)
    result = run_cli("fit", str(data), "--out", str(out), "--config", str(config), "--max-steps", "1")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr, result.stderr
    assert not out.exists()


def test_unreadable_image_is_named(tmp_path):
    good = tmp_path / "data" / "train" / "good"
    good.mkdir(parents=True)
    cv2.imwrite(str(good / "000.png"), np.full((32, 32, 3), 128, np.uint8))
    (good / "001.png").write_bytes(b"not a png")
    result = run_cli("fit", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--profile", "tiny")
    assert result.returncode == 1 and "001.png" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_synth_writes_pictures_a_user_can_open(tmp_path, datasets_dir):
    out = tmp_path / "synth"
    assert main(["synth", str(datasets_dir / "hazelnut"), "--out", str(out), "-n", "4", "--profile", "tiny"]) == 0
    pictures = sorted(out.glob("*.png"))
    assert len(pictures) == 5
    assert all(cv2.imread(str(p)) is not None for p in pictures)

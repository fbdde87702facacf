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
from trainer.data.mvtec import read_rgb, scan_mvtec
from trainer.evaluate import load_run
from trainer.objective import lr_factor
from trainer import precision as training_precision
from trainer.config import ConfigError, TrainConfig, load_train_config, reference_rows
from trainer.precision import autocast
from trainer import training
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
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["validation"]["step"] for r in log if "validation" in r] == [3, 6, 9, 12]
    config = json.loads((run / "config.json").read_text())
    selection, calibration = config["data"]["selection_images"], config["data"]["calibration_images"]
    assert selection and len(config["data"]["fingerprint"]) == 64
    assert config["data"]["foreground"] == {"mode": "object", "chosen_by": "auto", "images_showing_an_object": 1.0}
    assert config["data"]["textures"] == {"source": "procedural", "chosen_by": "auto"}
    # By default the pose is measured; hazelnut's nuts lie turned, so the resumed run above replayed
    # the pose draws as well.
    assert config["data"]["pose"]["chosen_by"] == "auto" and config["data"]["pose"]["mode"] == "rotate"
    assert config["train"]["lr_denoiser"] == 1e-3, "the tiny profile's budget-aware learning rate"
    # The images that chose the model do not set its thresholds (their scores are biased low).
    assert not set(selection) & set(calibration)
    assert thresholds["false_reject_rate"]["calibration_images"] == len(calibration) != len(selection)
    assert set(load_file(run / "model.safetensors")) == set(straight)


def test_one_data_loader_serves_the_whole_run(tmp_path, datasets_dir, fast_config, monkeypatch):
    """A loader per epoch started its worker process anew at every epoch, and the fork slowed training."""
    starts = []

    class CountingLoader(training.DataLoader):
        def __iter__(self):
            starts.append(self.num_workers)
            return super().__iter__()

    monkeypatch.setattr(training, "DataLoader", CountingLoader)
    fast_config.write_text(FAST_CONFIG.replace("num_workers = 0", "num_workers = 1"))
    run = tmp_path / "run"
    assert fit(datasets_dir / "hazelnut", run, fast_config, "--max-steps", "10") == 0
    steps_per_epoch = json.loads((run / "config.json").read_text())["data"]["train_images"] // 4
    assert 10 > steps_per_epoch and starts == [1]


def gray_copy(data: Path, out: Path) -> Path:
    """The data set as a mono camera sends it: every image one-channel."""
    for path in data.rglob("*"):
        target = out / path.relative_to(data)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif "ground_truth" in path.parts:
            target.write_bytes(path.read_bytes())
        else:
            assert cv2.imwrite(str(target), cv2.imread(str(path), cv2.IMREAD_GRAYSCALE))
    return out


@pytest.mark.slow
def test_a_gray_part_gets_a_one_channel_model_that_serves_from_rgb_frames(tmp_path, datasets_dir, fast_config):
    from edge.runtime.loader import load_model

    data = gray_copy(datasets_dir / "hazelnut", tmp_path / "gray")
    run = tmp_path / "run"
    assert fit(data, run, fast_config, "--max-steps", "3") == 0
    assert json.loads((run / "config.json").read_text())["data"]["color"] == {
        "mode": "gray", "chosen_by": "auto", "pixels_with_color": 0.0}
    cfg, model, _ = load_run(run)
    assert model.channels == 1 and model.denoiser.input_conv.in_channels == 1
    assert main(["eval", str(run), str(data), "--out", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "samples.png").is_file()

    # The station sends every frame as RGB (mono8 as three equal channels); the bundle's graph turns
    # it into the gray model's input itself.
    assert main(["export", str(run), "--out", str(tmp_path / "bundle"), "--target", "portable"]) == 0
    served = load_model(tmp_path / "bundle", "auto", head="norm-guided")
    images = np.stack([read_rgb(sample.image, model.image_size)
                       for sample in scan_mvtec(data, require_test=True).test[:4]])
    assert (images == images[..., :1]).all()
    maps, scores = served.infer(images)
    with torch.no_grad():
        ref_maps, ref_scores = model.fused(cfg.method).eval()(torch.from_numpy(images))
    np.testing.assert_allclose(scores, ref_scores.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(maps, ref_maps.numpy(), rtol=0, atol=1e-4)


@torch.no_grad()
def scores_of_test_images(run: Path, data: Path) -> tuple[list[str], np.ndarray]:
    """Each test image's defect type and score from the run's weights, computed here and not by `eval`
    (in batches of 8 as `eval` does, so that the scores are the same to the bit)."""
    cfg, model, _ = load_run(run)
    samples = scan_mvtec(data, require_test=True).test
    images = torch.from_numpy(np.stack([read_rgb(sample.image, model.image_size) for sample in samples]))
    fused = model.fused(cfg.method).eval()
    return [sample.defect for sample in samples], torch.cat([fused(batch)[1] for batch in images.split(8)]).numpy()


@pytest.mark.slow
def test_eval_writes_metrics_and_report(tmp_path, datasets_dir, fast_config, capsys):
    data = datasets_dir / "hazelnut"
    run, report = tmp_path / "run", tmp_path / "eval"
    assert fit(data, run, fast_config, "--max-steps", "3") == 0
    defects, scores = scores_of_test_images(run, data)
    good = np.array(defects) == "good"
    assert good.sum() == 6 and len(good) == 23  # and 17 colour
    # Ship a threshold that rejects some good images: an untrained model's own may pass everything.
    thresholds = json.loads((run / "thresholds.json").read_text())
    shipped = thresholds[thresholds["default"]]["image"] = float(np.sort(scores[good])[3])
    (run / "thresholds.json").write_text(json.dumps(thresholds))
    capsys.readouterr()
    assert main(["eval", str(run), str(data), "--out", str(report)]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_f1_max"):
        assert 0 <= metrics[key] <= 1, key
    assert set(metrics["per_defect"]) == {"colour"}
    assert metrics["run"]["images"] == 23
    radar = metrics["radar"]  # the second head, on the same images, at its own shipped threshold
    for key in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_f1_max"):
        assert 0 <= radar[key] <= 1, key
    assert sum(radar["verdicts"]["counts"].values()) == 23
    assert radar["verdicts"]["image_threshold"] == json.loads((run / "radar.json").read_text())[
        "thresholds"]["false_reject_rate"]["image"]
    assert (report / "radar_score_histogram.png").is_file()
    assert (report / "samples.png").stat().st_size > 10_000
    assert len(list(report.glob("*.png"))) >= 6

    # the verdicts at the shipped threshold, recounted from the scores computed here
    verdicts = metrics["verdicts"]
    assert verdicts["policy"] == thresholds["default"] and verdicts["image_threshold"] == shipped
    fails = scores >= shipped
    rejected, caught = int(fails[good].sum()), int(fails[~good].sum())
    assert 0 < rejected < 6
    assert verdicts["counts"] == {"true_pass": 6 - rejected, "false_reject": rejected, "escape": 17 - caught,
                                  "true_fail": caught}
    assert verdicts["false_reject_rate"] == pytest.approx(rejected / 6)
    assert verdicts["escape_rate"] == pytest.approx((17 - caught) / 17)
    assert verdicts["accuracy"] == pytest.approx((6 - rejected + caught) / 23)
    assert verdicts["recall"] == pytest.approx(caught / 17)
    assert verdicts["precision"] == pytest.approx(caught / (caught + rejected))
    assert verdicts["per_defect"] == {
        "good": {"images": 6, "rejected": rejected, "false_reject_rate": pytest.approx(rejected / 6)},
        "colour": {"images": 17, "caught": caught, "escape_rate": pytest.approx((17 - caught) / 17)}}
    assert f"false rejects {rejected}/6 " in capsys.readouterr().out
    histogram = report / "score_histogram.png"
    assert histogram.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    picture = cv2.imread(str(histogram))
    assert picture is not None and picture.shape[0] >= 300 and picture.shape[1] >= 500


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


def test_a_config_names_a_texture_folder_relative_to_itself_or_a_built_in_source(tmp_path):
    config = tmp_path / "configs" / "part.toml"
    config.parent.mkdir()
    config.write_text('textures = "dtd/images"\n')
    assert load_train_config(config).textures == tmp_path / "configs" / "dtd" / "images"
    for word in ("auto", "procedural", "none"):
        config.write_text(f'textures = "{word}"\n')
        assert load_train_config(config).textures == word
    assert load_train_config(None, textures=None).textures == "auto"  # absent on the command line
    assert TrainConfig.model_validate({"textures": None}).textures == "none"  # config.json of older runs


def test_readme_documents_every_training_setting_with_its_default():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for key, default, _ in reference_rows():
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, f"README training configuration table lacks {key}"
        assert f"| {default} |" in row, f"README row for {key} is stale: {row}"


def test_unreadable_image_is_named(tmp_path):
    good = tmp_path / "data" / "train" / "good"
    good.mkdir(parents=True)
    for name in ("000.png", "002.png", "003.png", "004.png"):
        cv2.imwrite(str(good / name), np.full((32, 32, 3), 128, np.uint8))
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


@pytest.mark.parametrize(("precision", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_training_autocast_on_the_cpu(precision, dtype):
    conv = torch.nn.Conv2d(3, 4, 3)
    with autocast(precision, torch.device("cpu")):
        assert conv(torch.rand(1, 3, 8, 8)).dtype == dtype


@pytest.mark.parametrize(("flags", "expected"), [({"avx2", "amx_bf16"}, "bf16"), ({"avx512_bf16"}, "bf16"),
                                                 ({"avx2", "avx512f", "avx512_vnni"}, "fp32")])
def test_auto_precision_is_bf16_only_on_a_cpu_with_native_bf16(monkeypatch, flags, expected):
    monkeypatch.setattr(training_precision, "station_cpu_features", lambda: frozenset(flags))
    precision, why = training_precision.resolve_precision("auto", torch.device("cpu"))
    assert precision == expected and why.startswith("auto: this CPU has")
    assert training_precision.resolve_precision("fp32", torch.device("cpu")) == ("fp32", "set in the config")


def test_fp16_on_a_cpu_is_refused_not_silently_trained_in_fp32():
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        training_precision.resolve_precision("fp16", torch.device("cpu"))

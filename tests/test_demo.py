"""The demo (`python -m harness.demo`) end to end as a subprocess, as `make demo` runs it: a real
broker (mosquitto, or amqtt embedded), the real daemon, a tiny exported model and the in-repo
hazelnut sample."""

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from mqtt_broker import mosquitto_path

from harness.summary import image_auroc
from trainer.cli import main as trainer_main

DEMO_IMAGES = Path(__file__).resolve().parents[1] / "demo" / "hazelnut" / "test"
FRAMES = 4
DEMO_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def demo_bundle(tiny_run: Path, tmp_path_factory) -> Path:
    bundle = tmp_path_factory.mktemp("demo") / "bundle"
    # A small max batch keeps the warm-ups short (the daemon's, and the demo's for the heat maps).
    assert trainer_main(["export", str(tiny_run), "--out", str(bundle), "--target", "portable",
                         "--max-batch", "2"]) == 0
    return bundle


@pytest.mark.slow
@pytest.mark.timeout(DEMO_TIMEOUT_S + 30)
@pytest.mark.parametrize("broker", ["mosquitto", "embedded"])
def test_demo_writes_a_verdict_an_overlay_and_a_summary_for_every_frame(broker, demo_bundle, tmp_path):
    if broker == "mosquitto":
        mosquitto_path()  # skips when it is not installed
    else:
        pytest.importorskip("amqtt", reason="the embedded broker needs the `demo` extra: pip install '.[demo]'")
    out = tmp_path / "demo-output"
    demo = subprocess.run(
        [sys.executable, "-m", "harness.demo", "--bundle", str(demo_bundle), "--images", str(DEMO_IMAGES),
         "--out", str(out), "--limit", str(FRAMES), "--broker", broker],
        capture_output=True, text=True, timeout=DEMO_TIMEOUT_S)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"] == summary["frames_sent"] == summary["results"] == FRAMES
    assert summary["pass"] + summary["fail"] == FRAMES
    assert 0 <= summary["accuracy"] <= 1
    assert 0 < summary["latency_ms"]["p50"] <= summary["latency_ms"]["p99"]
    assert summary["throughput_fps"] > 0
    assert summary["broker"].startswith("mosquitto" if broker == "mosquitto" else "embedded amqtt")
    overlays = sorted(out.glob("*.png"))
    assert [p.name for p in overlays] == sorted(frame["overlay"] for frame in summary["per_frame"])
    for path in overlays:
        picture = cv2.imread(str(path))
        assert picture is not None and picture.shape[1] == 2 * 512, path  # frame | heat map, side by side
    for frame in summary["per_frame"]:  # each verdict printed live, with its ground truth
        assert any(frame["image"] in line and f"truth {frame['truth']}" in line for line in demo.stdout.splitlines())


def test_image_auroc_matches_scikit_learn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 40).astype(float)  # few values: many ties
    defective = rng.random(40) < 0.4
    assert image_auroc(scores, defective) == pytest.approx(roc_auc_score(defective, scores))
    assert image_auroc(scores, np.zeros(40, dtype=bool)) is None

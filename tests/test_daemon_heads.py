"""`edge serve` with `inference.head`: the RADAR head over real ZeroMQ and MQTT gives the scores of
its own program run offline; a head the bundle lacks stops the station before it is ready."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from mqtt_broker import Subscriber
from station_process import PREFIX, results_by_frame

from protocols.bundle import MANIFEST_DIGEST_NAME, MANIFEST_NAME, Manifest, sha256_file
from protocols.publisher import FramePublisher

pytestmark = pytest.mark.slow
FRAMES = 50


def hazelnut_frames(test_dir: Path, size: int, count: int) -> np.ndarray:
    """`count` frames cycling over the real test images (good and defective), RGB at model size."""
    images = [cv2.resize(cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB), (size, size),
                         interpolation=cv2.INTER_AREA) for p in sorted(test_dir.rglob("*.jpg"))]
    return np.stack([images[i % len(images)] for i in range(count)])


def test_the_radar_head_answers_real_frames_with_its_programs_offline_scores(bundles, hazelnut_dir,
                                                                             daemon_factory, broker):
    manifest = Manifest.model_validate_json((bundles[0] / MANIFEST_NAME).read_text())
    head = manifest.head("radar")
    frames = hazelnut_frames(hazelnut_dir, manifest.input.height, FRAMES)
    daemon = daemon_factory(bundles[0], head="radar")
    with Subscriber(broker.port, f"{PREFIX}/#") as sub:
        with FramePublisher(daemon.endpoint) as camera:
            for i, frame in enumerate(frames):
                camera.send_image(frame, f"{i:06d}", pixel_format="rgb8")
        results = results_by_frame(sub, FRAMES)
    program = torch.export.load(bundles[0] / "radar.pt2").module()
    with torch.no_grad():
        features = np.concatenate([program(torch.from_numpy(chunk))[1].numpy()
                                   for chunk in np.array_split(frames, -(-FRAMES // manifest.input.max_batch))])
    expected = head.method.one_class.score(features)
    assert sorted(results) == [f"{i:06d}" for i in range(FRAMES)]
    for i, result in enumerate(results[f"{i:06d}"] for i in range(FRAMES)):
        assert result.model.head == "radar" and result.threshold == head.thresholds.image
        assert result.score == pytest.approx(expected[i], abs=1e-5)
        assert result.verdict == ("fail" if result.score >= result.threshold else "pass")
    logged = [json.loads(line) for line in daemon.log_path.read_text().splitlines() if line.startswith("{")]
    ready = [line for line in logged if line.get("event") == "ready"]
    assert ready[0]["model"]["head"] == "radar"
    assert ready[0]["thresholds"] == head.thresholds.model_dump(mode="json", exclude_none=True)
    # the tiny run calibrated on 6 good images: its stated rate is a fit, and the station says so
    assert head.thresholds.estimator == "logit-normal"
    warned = [line for line in logged if line.get("event") == "thresholds_rest_on_few_images"]
    assert warned and warned[0]["calibration_images"] == head.thresholds.calibration_images


def test_thresholds_from_the_station_settings_are_logged_as_stating_no_rate(bundles, daemon_factory, broker):
    daemon = daemon_factory(bundles[0], head="norm-guided", image_threshold=0.5)
    daemon.wait_for_log("thresholds_set_by_station_settings", timeout_s=30)
    logged = [json.loads(line) for line in daemon.log_path.read_text().splitlines() if line.startswith("{")]
    events = [line["event"] for line in logged]
    assert "thresholds_rest_on_few_images" not in events  # the bundle's rate is not what is served
    overridden = next(line for line in logged if line["event"] == "thresholds_set_by_station_settings")
    bundle_head = Manifest.model_validate_json((bundles[0] / MANIFEST_NAME).read_text()).head("norm-guided")
    assert (overridden["image"], overridden["bundle_image"]) == (0.5, bundle_head.thresholds.image)


def test_a_head_the_bundle_lacks_stops_the_station_before_ready_in_one_line(bundles, tmp_path):
    bundle = tmp_path / "norm-guided-only"
    bundle.mkdir()
    manifest = Manifest.model_validate_json((bundles[0] / MANIFEST_NAME).read_text())
    manifest = manifest.model_copy(update={"heads": [manifest.head("norm-guided")], "recommended_head": "norm-guided"})
    for entry in manifest.files:
        shutil.copyfile(bundles[0] / entry.path, bundle / entry.path)
    (bundle / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2))
    (bundle / MANIFEST_DIGEST_NAME).write_text(sha256_file(bundle / MANIFEST_NAME))
    config = tmp_path / "edge.toml"
    config.write_text(f'bundle = "{bundle}"\nstate_dir = "{tmp_path / "state"}"\nmetrics_port = 0\n'
                      '[zmq]\nbind = "tcp://127.0.0.1:*"\n[inference]\nhead = "radar"\n')
    done = subprocess.run([sys.executable, "-m", "edge", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "the bundle has no radar head (its heads: norm-guided)" in done.stderr, (
        done.stderr)

"""`edge serve` end to end, as a separate process: real ZeroMQ sockets, a real mosquitto, real
exported models, real signals. Every wait is bounded."""

import base64
import json
import os
import re
import shutil
import signal
import threading
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq
from mqtt_broker import Subscriber
from station_process import PREFIX, results_by_frame

from edge.replay import replay
from protocols.bundle import MANIFEST_NAME, Manifest
from protocols.messages import ErrorReport, Result, Status

pytestmark = pytest.mark.slow


def test_200_replayed_frames_give_exactly_200_results_with_masks(bundles, hazelnut_dir, daemon_factory, broker):
    daemon = daemon_factory(bundles[0])
    with Subscriber(broker.port, f"{PREFIX}/#") as sub:
        status = Status.model_validate_json(sub.wait_for(f"{PREFIX}/status", 1)[0].payload)
        assert status.state == "online" and status.model.sha256
        assert replay(hazelnut_dir, daemon.endpoint, loop=True, limit=200) == 200
        results = results_by_frame(sub, 200)
        time.sleep(1.0)  # anything extra would arrive now
        messages = sub.messages(f"{PREFIX}/cam0/result")
    assert sorted(results) == [f"{i:06d}" for i in range(200)]
    manifest = Manifest.model_validate_json((bundles[0] / MANIFEST_NAME).read_text())
    served = manifest.head(manifest.recommended_head)  # inference.head = "auto"
    assert len(messages) == 200, "duplicates without an outage"
    for result in results.values():
        assert result.verdict in ("pass", "fail") and 0 <= result.score <= 1
        assert result.threshold == served.thresholds.image
        assert (result.verdict == "fail") == (result.score >= result.threshold)
        assert result.latency_ms.total >= result.latency_ms.infer > 0
        assert (result.mask is None and not result.regions) if result.verdict == "pass" else result.mask
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=5).read().decode()
    assert "edge_frames_received_total 200.0" in metrics
    assert 'edge_latency_seconds_count{stage="infer"} 200.0' in metrics


def decoded_mask(result: Result) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(base64.b64decode(result.mask), np.uint8), cv2.IMREAD_UNCHANGED)


@pytest.mark.parametrize(("image_threshold", "regions_on_pass"), [(0.0, False), (1.01, False), (1.01, True)])
def test_only_fails_carry_regions_and_every_fail_shows_where(bundles, hazelnut_dir, daemon_factory, broker,
                                                          image_threshold, regions_on_pass):
    """Thresholds forced so every frame fails (0) or passes (above any score)."""
    daemon = daemon_factory(bundles[0], image_threshold=image_threshold,
                            sections={"result": {"regions_on_pass": regions_on_pass}})
    with Subscriber(broker.port, f"{PREFIX}/#") as sub:
        assert replay(hazelnut_dir, daemon.endpoint, limit=8) == 8
        results = results_by_frame(sub, 8)
    for result in results.values():
        assert result.verdict == ("fail" if image_threshold == 0 else "pass")
        if result.verdict == "fail":
            # min(pixel, image) threshold: a fail's highest pixels always show
            assert result.regions and decoded_mask(result).shape == (512, 512) and decoded_mask(result).any()
        elif regions_on_pass:
            assert result.mask is not None and decoded_mask(result).shape == (512, 512)
        else:
            assert result.mask is None and result.regions == []


def test_malformed_messages_each_get_an_error_and_the_daemon_keeps_serving(bundles, daemon_factory, broker):
    daemon = daemon_factory(bundles[0])
    good = {"v": 1, "camera_id": "cam0", "frame_id": "ok", "ts_ns": 1, "encoding": "raw", "width": 64,
            "height": 48, "pixel_format": "bgr8"}
    pixels = np.zeros((48, 64, 3), np.uint8).tobytes()
    bad = [
        [b"{not json", pixels],
        [json.dumps({k: v for k, v in good.items() if k != "frame_id"}).encode(), pixels],
        [json.dumps({**good, "frame_id": "short"}).encode(), pixels[:-1]],
        [json.dumps({**good, "frame_id": "jpeg", "encoding": "jpeg", "pixel_format": None}).encode(),
         b"\xff\xd8\xff\xe0 not really a jpeg"],
        [json.dumps({**good, "frame_id": "three"}).encode(), pixels, b"extra"],
        [json.dumps({**good, "frame_id": "empty-jpeg", "encoding": "jpeg", "pixel_format": None}).encode(), b""],
        [json.dumps({**good, "frame_id": "huge", "width": 16384, "height": 16384}).encode(), pixels],
    ]
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 5000)
    push.connect(daemon.endpoint)
    with Subscriber(broker.port, f"{PREFIX}/#") as sub:
        for parts in bad:
            push.send_multipart(parts)
        push.send_multipart([json.dumps(good).encode(), pixels])
        errors = [ErrorReport.model_validate_json(m.payload) for m in sub.wait_for(f"{PREFIX}/error", len(bad), 60)]
        result = Result.model_validate_json(sub.wait_for(f"{PREFIX}/cam0/result", 1, 60)[0].payload)
    push.close()
    context.term()
    reasons = [e.reason for e in errors]
    for expected in ("not valid JSON", "frame_id", "needs 9216", "not a decodable JPEG", "3 parts",
                     "over the limit of 64000000"):
        assert any(expected in r for r in reasons), (expected, reasons)
    assert {e.frame_id for e in errors} >= {"short", "jpeg", "three", "empty-jpeg", "huge"}
    assert {e.kind for e in errors} == {"rejected"}
    assert result.frame_id == "ok" and daemon.process.poll() is None


def test_broker_outage_loses_no_verdict(bundles, hazelnut_dir, daemon_factory, broker):
    daemon = daemon_factory(bundles[0])
    with Subscriber(broker.port, f"{PREFIX}/#") as sub:
        sender = threading.Thread(target=replay, args=(hazelnut_dir, daemon.endpoint),
                                  kwargs={"fps": 10, "loop": True, "limit": 150})
        sender.start()
        time.sleep(3)
        broker.stop()
        time.sleep(10)
        broker.start()
        sender.join(60)
        results = results_by_frame(sub, 150, timeout_s=90)
    assert sorted(results) == [f"{i:06d}" for i in range(150)]


def test_sigkill_publishes_the_will_and_a_restart_delivers_the_pending_outbox(bundles, hazelnut_dir,
                                                                              daemon_factory, broker, tmp_path):
    daemon = daemon_factory(bundles[0])
    with Subscriber(broker.port, f"{PREFIX}/#") as sub:
        sub.wait_until(f"{PREFIX}/status", lambda ms: ms and Status.model_validate_json(ms[-1].payload).state == "online")
        daemon.process.kill()
        daemon.wait()
        sub.wait_until(f"{PREFIX}/status", lambda ms: Status.model_validate_json(ms[-1].payload).state == "offline", 15)

    # Verdicts made while the broker is away are on disk when the daemon dies.
    daemon = daemon_factory(bundles[0], workdir=tmp_path)
    broker.stop()
    assert replay(hazelnut_dir, daemon.endpoint, limit=12) == 12
    deadline = time.monotonic() + 60
    while daemon.outbox_depth() < 12 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert daemon.outbox_depth() == 12
    daemon.process.kill()
    daemon.wait()
    broker.start()
    with Subscriber(broker.port, f"{PREFIX}/#") as sub:
        daemon_factory(bundles[0], workdir=tmp_path)
        assert sorted(results_by_frame(sub, 12, 60)) == [f"{i:06d}" for i in range(12)]


def test_sigterm_publishes_every_queued_verdict_before_exit(bundles, hazelnut_dir, daemon_factory, broker):
    # A long batching wait keeps accepted frames queued when SIGTERM arrives.
    daemon = daemon_factory(bundles[0], max_batch=16, max_wait_ms=3000.0)
    with Subscriber(broker.port, f"{PREFIX}/#") as sub:
        assert replay(hazelnut_dir, daemon.endpoint, limit=10) == 10
        time.sleep(0.5)
        daemon.send(signal.SIGTERM)
        assert daemon.wait(60) == 0
        assert sorted(results_by_frame(sub, 10, 30)) == [f"{i:06d}" for i in range(10)]
        assert Status.model_validate_json(sub.messages(f"{PREFIX}/status")[-1].payload).state == "offline"
    queued = re.search(r'"queued": ?(\d+)', daemon.log())
    assert queued and int(queued[1]) > 0, "the frames must still have been queued at SIGTERM\n" + daemon.log()


FRAMES = 600  # 30 s at 20 fps: the reload (verify, load, warm up) happens while frames keep coming


def test_sighup_swaps_the_model_under_load_without_losing_a_frame(bundles, hazelnut_dir, daemon_factory,
                                                                   broker, tmp_path):
    current = tmp_path / "current"
    current.symlink_to(bundles[0])
    daemon = daemon_factory(current)
    new_sha = (bundles[1] / "manifest.sha256").read_text().strip()
    with Subscriber(broker.port, f"{PREFIX}/#") as sub:
        sender = threading.Thread(target=replay, args=(hazelnut_dir, daemon.endpoint),
                                  kwargs={"fps": 20, "loop": True, "limit": FRAMES})
        sender.start()
        sub.wait_for(f"{PREFIX}/cam0/result", 20, 60)
        # A broken bundle is refused and the old model keeps serving.
        broken = tmp_path / "broken"
        shutil.copytree(bundles[1], broken)
        with open(broken / "model.pt2", "r+b") as f:
            f.seek(100)
            f.write(b"\x00\x01")
        os.replace(_symlink(tmp_path, broken), current)
        daemon.send(signal.SIGHUP)
        sub.wait_until(f"{PREFIX}/error", lambda ms: any(b"reload refused" in m.payload for m in ms), 60)
        os.replace(_symlink(tmp_path, bundles[1]), current)
        daemon.send(signal.SIGHUP)
        sub.wait_until(f"{PREFIX}/status", lambda ms: Status.model_validate_json(ms[-1].payload).model.sha256
                       == new_sha, 60)
        assert sender.is_alive(), "the swap must happen under load"
        sender.join(120)
        results = results_by_frame(sub, FRAMES, 120)
    assert sorted(results) == [f"{i:06d}" for i in range(FRAMES)]
    ordered = [results[f"{i:06d}"].model.sha256 for i in range(FRAMES)]
    old, new = ordered[0], ordered[-1]
    assert old != new == new_sha, "results must switch to the new model's identity"
    switch = ordered.index(new)
    assert set(ordered[:switch]) == {old} and set(ordered[switch:]) == {new}
    assert daemon.process.poll() is None


def _symlink(tmp_path: Path, target: Path) -> Path:
    link = tmp_path / f"link-{target.name}-{time.monotonic_ns()}"
    link.symlink_to(target)
    return link

"""A station that never goes silent: `edge serve` under hostile input, failing models, a full outbox,
deploys, broker restarts and SIGKILL. Real mosquitto, real sockets, real exported tiny bundles
(some made to misbehave on purpose), bounded loops."""

import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import zmq
from hostile_frames import hostile_messages
from mqtt_broker import Subscriber, _free_port
from station_process import PREFIX, STATION, faulty_bundle, wait_for_answers

from edge.replay import replay
from protocols.messages import ErrorReport, Result, Status
from protocols.publisher import FramePublisher

pytestmark = pytest.mark.slow
WHITE = np.full((64, 64, 3), 255, np.uint8)


def raise_on_white(images, maps, scores):
    torch._assert_async((images.float().mean(dim=(1, 2, 3)) < 250).all(), "white frame")
    return maps, scores


def nan_on_white(images, maps, scores):
    white = images.float().mean(dim=(1, 2, 3)) > 250
    return torch.where(white[:, None, None], float("nan"), maps), torch.where(white, float("nan"), scores)


def always_raise(images, maps, scores):
    torch._assert_async(images.float().mean() < -1.0, "this model never works")
    return maps, scores


@pytest.fixture(scope="module")
def faulty(tiny_run, bundles, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("faulty-bundles")
    return {name: faulty_bundle(tiny_run, bundles[0], root / name, fault, name)
            for name, fault in (("raise-on-white", raise_on_white), ("nan-on-white", nan_on_white),
                                ("always-raise", always_raise))}


def real_frames(hazelnut_dir: Path, count: int) -> list[np.ndarray]:
    paths = sorted(hazelnut_dir.rglob("*.jpg"))[:count]
    return [cv2.resize(cv2.imread(str(p)), (128, 128), interpolation=cv2.INTER_AREA) for p in paths]


def metric(daemon, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=5).read().decode()
    found = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
    assert found, f"{name} not in metrics"
    return float(found[1])


def states(sub: Subscriber) -> list[str]:
    return [Status.model_validate_json(m.payload).state for m in sub.messages(f"{PREFIX}/status")]


def test_fuzz_10000_hostile_messages_then_valid_frames_all_answered_within_a_memory_bound(
        bundles, hazelnut_dir, daemon_factory, broker):
    limits = {"max_payload_bytes": 8 << 20, "max_pixels": 4_000_000, "rcvhwm": 4}
    daemon = daemon_factory(bundles[0], sections={"zmq": limits}, max_batch=4)
    bound_mb = json.loads(next(line for line in daemon.log_path.read_text().splitlines()
                               if '"ready"' in line))["frame_memory_bound_mb"]
    ready_peak_mb = daemon.memory().peak_mb
    messages = hostile_messages(np.random.default_rng(2026), 10_000, bomb_side=1200)
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDTIMEO, 60_000)
    push.connect(daemon.endpoint)
    with Subscriber(broker.port, f"{PREFIX}/#") as sub:
        for parts in messages:
            push.send_multipart(parts)
        # A message part over MAXMSGSIZE never reaches the decoder: ZeroMQ drops that connection.
        oversize = context.socket(zmq.PUSH)
        oversize.connect(daemon.endpoint)
        oversize.send_multipart([b"{}", bytes(9 << 20)])
        with FramePublisher(daemon.endpoint, context=context) as camera:
            for i, image in enumerate(real_frames(hazelnut_dir, 20)):
                camera.send_image(image, f"valid{i:02d}", timeout_ms=60_000)
            got = wait_for_answers(sub, {f"valid{i:02d}" for i in range(20)}, 120, daemon)
        oversize.close(linger=0)
    push.close(linger=60_000)  # what the valid frames overtook still goes out: term() waits for it
    context.term()
    assert all(isinstance(got[f"valid{i:02d}"][0], Result) for i in range(20))
    assert daemon.process.poll() is None
    deadline = time.monotonic() + 120
    while True:  # the valid frames may overtake the hostile stream (ZeroMQ queues fairly per camera)
        rejected = metric(daemon, "edge_frames_rejected_total")
        verdicts = sum(metric(daemon, f'edge_results_total{{verdict="{v}"}}') for v in ("pass", "fail"))
        if rejected + verdicts >= len(messages) + 20 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    # Read after the answers: a message is counted as received before it is answered, so an earlier
    # read could miss the last one while it was between the two counters.
    received = metric(daemon, "edge_frames_received_total")
    assert received == len(messages) + 20, "every message reached the decoder (none over MAXMSGSIZE)"
    assert rejected + verdicts == received, "every message got exactly one answer: an error or a verdict"
    assert rejected > 8_000 and metric(daemon, "edge_camera_disconnects_total") >= 1
    growth_mb = daemon.memory().peak_mb - ready_peak_mb
    print(f"fuzz: peak RSS {ready_peak_mb:.0f} MB at ready, +{growth_mb:.0f} MB after; stated bound {bound_mb} MB")
    assert growth_mb <= bound_mb, f"peak RSS grew {growth_mb:.0f} MB during the fuzz; the stated bound is {bound_mb} MB"


def send(endpoint: str, frames: list[tuple[str, np.ndarray]], interval_s: float = 0.0, meta: dict | None = None):
    camera = FramePublisher(endpoint)
    try:
        for frame_id, image in frames:
            camera.send_image(image, frame_id, meta=meta, timeout_ms=120_000)
            time.sleep(interval_s)
    finally:
        camera.close(linger_ms=120_000)  # a daemon holding back (full disk) still gets the last frames


def test_a_backend_that_raises_answers_every_frame_degrades_reloads_and_isolates_bad_frames(
        faulty, hazelnut_dir, daemon_factory, broker):
    daemon = daemon_factory(faulty["raise-on-white"], max_batch=2)
    normal = real_frames(hazelnut_dir, 12)
    with Subscriber(broker.port, f"{PREFIX}/#") as sub:
        send(daemon.endpoint, [(f"w{i}", WHITE) for i in range(10)], interval_s=0.05)
        sub.wait_until(f"{PREFIX}/status", lambda ms: "degraded" in states(sub), 60)
        sub.wait_until(f"{PREFIX}/status", lambda ms: states(sub)[-1] == "online", 60)  # reloaded
        mixed = [(f"x{i}", WHITE if i % 3 == 0 else normal[i]) for i in range(12)]
        send(daemon.endpoint, mixed)
        got = wait_for_answers(sub, {f"w{i}" for i in range(10)} | {f"x{i}" for i in range(12)}, 60, daemon)
    sha = (faulty["raise-on-white"] / "manifest.sha256").read_text().strip()
    for frame_id, answer in got.items():
        assert len(answer) == 1, f"{frame_id}: exactly one answer, got {answer}"
        white = frame_id.startswith("w") or int(frame_id[1:]) % 3 == 0
        if white:
            assert isinstance(answer[0], ErrorReport) and answer[0].kind == "not_inspected"
            assert "white frame" in answer[0].reason and answer[0].model.sha256 == sha
        else:  # a bad frame in its batch does not take the others down
            assert isinstance(answer[0], Result), answer
    assert daemon.process.poll() is None
    assert '"reload_done"' in daemon.log_path.read_text()


def test_non_finite_outputs_are_fail_verdicts_with_flags(faulty, hazelnut_dir, daemon_factory, broker):
    daemon = daemon_factory(faulty["nan-on-white"], max_batch=2)
    with Subscriber(broker.port, f"{PREFIX}/#") as sub:
        send(daemon.endpoint, [("white", WHITE), *((f"n{i}", im) for i, im in enumerate(real_frames(hazelnut_dir, 3)))])
        got = wait_for_answers(sub, {"white", "n0", "n1", "n2"}, 60, daemon)
    white = got["white"][0]
    assert white.verdict == "fail" and white.score is None
    assert set(white.flags) == {"non_finite_score", "non_finite_map"}
    mask = cv2.imdecode(np.frombuffer(base64.b64decode(white.mask), np.uint8), cv2.IMREAD_GRAYSCALE)
    assert mask.min() == 255, "pixels without a finite value count as defective"
    assert all(got[f"n{i}"][0].score is not None and not got[f"n{i}"][0].flags for i in range(3))


def test_a_worker_thread_that_dies_faults_the_station_and_its_frames_still_get_answers(
        bundles, hazelnut_dir, broker, tmp_path):
    from edge.daemon import Daemon
    from edge.settings import load_settings

    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    settings = load_settings(None, bundle=bundles[0], station_id=STATION, state_dir=tmp_path / "state",
                             metrics_port=0, reload_watch=False, zmq={"bind": endpoint},
                             mqtt={"port": broker.port, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5},
                             inference={"max_batch": 2, "max_wait_ms": 50.0})
    daemon = Daemon(settings)
    publish, calls = daemon.link.publish_answers, []

    def fails_once(answers, settle):
        calls.append(len(answers))
        if len(calls) == 3:
            deadline = time.monotonic() + 30  # once every frame is in: they were all accepted
            while daemon.metrics.frames_in._value.get() < 12 and time.monotonic() < deadline:
                time.sleep(0.01)
            raise RuntimeError("simulated bug in the publisher")
        publish(answers, settle)

    daemon.link.publish_answers = fails_once
    exit_code = []
    runner = threading.Thread(target=lambda: exit_code.append(daemon.run()))
    with Subscriber(broker.port, f"{PREFIX}/#") as sub:
        runner.start()
        send(endpoint, [(f"f{i}", im) for i, im in enumerate(real_frames(hazelnut_dir, 12))], interval_s=0.02)
        runner.join(90)
        got = wait_for_answers(sub, {f"f{i}" for i in range(12)}, 30)
        assert "faulted" in states(sub) and states(sub)[-1] == "offline"
    assert exit_code == [1]
    errors = [a[0] for a in got.values() if isinstance(a[0], ErrorReport)]
    assert errors and all("publisher thread died" in e.reason for e in errors)
    assert all(len(a) == 1 for a in got.values())


def test_a_busy_frame_port_fails_before_ready_in_one_line(tmp_path):
    with socket_bound() as port:
        config = tmp_path / "edge.toml"
        config.write_text(f'bundle = "{tmp_path / "no-bundle"}"\nstate_dir = "{tmp_path}"\nmetrics_port = 0\n'
                          f'[zmq]\nbind = "tcp://127.0.0.1:{port}"\n')
        done = subprocess.run([sys.executable, "-m", "edge", "serve", "--config", str(config)],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "cannot bind tcp://127.0.0.1" in done.stderr, done.stderr


@contextlib.contextmanager
def socket_bound():
    """A port on 127.0.0.1 that another ZeroMQ socket holds."""
    context = zmq.Context()
    sock = context.socket(zmq.PULL)
    try:
        yield sock.bind_to_random_port("tcp://127.0.0.1")
    finally:
        sock.close(linger=0)
        context.term()


def test_outbox_quota_with_the_broker_away_discards_the_oldest_and_reports_it(
        bundles, hazelnut_dir, daemon_factory, broker):
    daemon = daemon_factory(bundles[0], sections={"outbox": {"max_messages": 25}})
    with Subscriber(broker.port, f"{PREFIX}/#") as sub:
        broker.stop()
        assert replay(hazelnut_dir, daemon.endpoint, loop=True, limit=60) == 60
        daemon.wait_for_log('"outbox_full"', 60)
        assert daemon.process.poll() is None and daemon.outbox_depth() <= 25
        assert metric(daemon, "edge_outbox_evicted") > 0
        broker.start()
        reports = sub.wait_until(f"{PREFIX}/error", lambda ms: any(b"outbox quota reached" in m.payload for m in ms), 60)
        got = wait_for_answers(sub, {"000059"}, 60, daemon)
    assert isinstance(got["000059"][0], Result), "the newest verdicts are kept"
    report = next(ErrorReport.model_validate_json(m.payload) for m in reports if b"outbox quota" in m.payload)
    assert report.kind == "station"


def test_a_full_outbox_disk_degrades_without_a_crash_and_recovers(bundles, hazelnut_dir, daemon_factory, broker,
                                                                 tmp_path):
    disk = tmp_path / "small-disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): the quota test covers the outbox limit")
    try:
        (tmp_path / "state").symlink_to(disk)  # only the outbox on the small disk, not the log
        daemon = daemon_factory(bundles[0])
        frames = [(f"{i:03d}", im) for i, im in enumerate(real_frames(hazelnut_dir, 20) * 5)]
        with Subscriber(broker.port, f"{PREFIX}/#") as sub:
            broker.stop()
            # Big answers (meta is echoed) fill the 1 MB disk within a few dozen frames.
            sender = threading.Thread(target=send, args=(daemon.endpoint, frames), kwargs={"meta": {"m": "m" * 15_000}})
            sender.start()
            daemon.wait_for_log("outbox not writable", 90)
            assert daemon.process.poll() is None
            subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
            sender.join(120)
            broker.start()
            try:
                got = wait_for_answers(sub, {frame_id for frame_id, _ in frames}, 120, daemon)
            except AssertionError as err:
                raise AssertionError(f"{err}\nbroker log:\n{broker.log()}") from None
        assert all(len(a) == 1 for a in got.values())
        assert daemon.process.poll() is None
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_reload_of_a_bundle_failing_warm_up_under_load_keeps_serving_and_a_cp_p_deploy_is_noticed(
        bundles, faulty, hazelnut_dir, daemon_factory, broker, tmp_path):
    current = tmp_path / "current"
    shutil.copytree(bundles[0], current)
    daemon = daemon_factory(current, reload_watch=True)

    def deploy(source: Path) -> None:
        """In place, the digest last; with the same mtime as the file it replaces (a watch on
        mtimes would miss this deploy)."""
        stamp = (current / "manifest.sha256").stat().st_mtime_ns
        os.utime(source / "manifest.sha256", ns=(stamp, stamp))
        for path in sorted(source.iterdir(), key=lambda p: p.name == "manifest.sha256"):
            subprocess.run(["cp", "-p", str(path), str(current / path.name)], check=True)

    frames = 800  # 40 s at 20 fps: both reloads (two warm-ups) fit in it on a busy machine too
    with Subscriber(broker.port, f"{PREFIX}/#") as sub:
        sender = threading.Thread(target=replay, args=(hazelnut_dir, daemon.endpoint),
                                  kwargs={"fps": 20, "loop": True, "limit": frames})
        sender.start()
        sub.wait_for(f"{PREFIX}/cam0/result", 10, 60)
        deploy(faulty["always-raise"])
        sub.wait_until(f"{PREFIX}/error", lambda ms: any(b"fails its warm-up" in m.payload for m in ms), 60)
        assert daemon.process.poll() is None
        deploy(bundles[1])
        new_sha = (bundles[1] / "manifest.sha256").read_text().strip()
        sub.wait_until(f"{PREFIX}/status", lambda ms: Status.model_validate_json(ms[-1].payload).model.sha256
                       == new_sha, 60)
        assert sender.is_alive(), "both reloads must happen under load"
        sender.join(120)
        got = wait_for_answers(sub, {f"{i:06d}" for i in range(frames)}, 120, daemon)
    assert all(len(a) == 1 and isinstance(a[0], Result) for a in got.values())
    shas = [got[f"{i:06d}"][0].model.sha256 for i in range(frames)]
    assert shas[-1] == new_sha and len(set(shas)) == 2, "only the good bundle ever served"


def test_broker_restart_and_sigkill_mid_stream_every_accepted_frame_is_answered(
        bundles, hazelnut_dir, daemon_factory, broker, tmp_path):
    # A long batching wait keeps accepted frames queued when the SIGKILL comes.
    daemon = daemon_factory(bundles[0], workdir=tmp_path, max_batch=16, max_wait_ms=2000.0)
    with Subscriber(broker.port, f"{PREFIX}/#") as sub:
        sender = threading.Thread(target=replay, args=(hazelnut_dir, daemon.endpoint),
                                  kwargs={"fps": 10, "loop": True, "limit": 24})
        sender.start()
        time.sleep(0.5)
        broker.stop()
        time.sleep(1.5)
        broker.start()
        sender.join(30)
        time.sleep(0.6)
        daemon.process.kill()
        daemon.wait()
        journal = {row[0] for row in daemon.table("SELECT frame_id FROM accepted")}
        assert journal, "frames were accepted and not yet answered when the daemon died"
        daemon_factory(bundles[0], workdir=tmp_path, max_batch=16, max_wait_ms=2000.0)
        got = wait_for_answers(sub, {f"{i:06d}" for i in range(24)}, 90, daemon)
    assert all(len(a) == 1 for a in got.values()), "one answer per frame (de-duplicated on answer ids)"
    for frame_id in journal:
        assert isinstance(got[frame_id][0], ErrorReport) and "crash or power loss" in got[frame_id][0].reason
    assert all(isinstance(got[f][0], Result) for f in got if f not in journal)

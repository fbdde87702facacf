"""ZeroMQ CURVE between cameras and the station: certificates from `edge keys`, real sockets on
127.0.0.1, pyzmq's authenticator, and `edge serve` as a separate process. Every wait is bounded."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.auth
from mqtt_broker import Subscriber
from prometheus_client import CollectorRegistry, Counter
from station_process import PREFIX, answers, results_by_frame
from zmq.utils.monitor import recv_monitor_message

from edge.camera_auth import HANDSHAKE_FAILED, CameraAuth, RefusalLog, exposed_without_auth
from edge.cli import main
from edge.settings import CurveSettings, ZmqSettings
from protocols.messages import FrameHeader
from protocols.publisher import CurveClientKeys, FramePublisher

pytestmark = pytest.mark.timeout(300)

SENT = 100           # frames each unauthorised sender tries to get in
AUTHORISED = 20      # frames the authorised camera sends
WAIT_S = 30.0        # bound on every wait for something to happen
IMAGE = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


@dataclass(frozen=True)
class Keys:
    out: Path          # every pair `edge keys` wrote
    authorized: Path   # the station's zmq.curve.authorized_keys_dir: cam1 only

    def client(self, camera: str) -> CurveClientKeys:
        return CurveClientKeys.from_files(self.out / "station.key", self.out / f"{camera}.key_secret")

    def curve(self) -> CurveSettings:
        return CurveSettings(secret_key_file=self.out / "station.key_secret", authorized_keys_dir=self.authorized)


@pytest.fixture
def keys(tmp_path: Path, capsys) -> Keys:
    out, authorized = tmp_path / "keys", tmp_path / "authorized"
    for name in ("station", "cam1", "rogue"):
        assert main(["keys", "--out", str(out), "--name", name]) == 0
    capsys.readouterr()
    authorized.mkdir()
    shutil.copy(out / "cam1.key", authorized)
    return Keys(out, authorized)


@pytest.fixture
def curve_env(keys: Keys, monkeypatch) -> Keys:
    """The daemons started by the test get zmq.curve through the environment (they inherit it)."""
    monkeypatch.setenv("EDGE_ZMQ__CURVE__SECRET_KEY_FILE", str(keys.out / "station.key_secret"))
    monkeypatch.setenv("EDGE_ZMQ__CURVE__AUTHORIZED_KEYS_DIR", str(keys.authorized))
    return keys


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} not in the metrics"
    return float(found[1])


def refusals(port: int, reason: str) -> float:
    return metric(port, f'edge_camera_refusals_total{{reason="{reason}"}}')


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {WAIT_S} s"
        time.sleep(0.1)


def log_events(log: str, event: str) -> list[dict]:
    return [entry for entry in (json.loads(line) for line in log.splitlines() if line.startswith("{"))
            if entry.get("event") == event]


def send_frames(publisher: FramePublisher, prefix: str, count: int) -> None:
    for i in range(count):
        publisher.send_image(IMAGE, f"{prefix}{i:03d}", timeout_ms=5000)


# ---- the station end to end -------------------------------------------------------------------

def plain_push(context: zmq.Context, endpoint: str, frame_id: str) -> zmq.Socket:
    """A PUSH socket without CURVE that queues one valid frame as it connects."""
    sock = context.socket(zmq.PUSH)
    sock.linger = 0
    sock.reconnect_ivl = 60_000  # one handshake in this test (it would retry every 100 ms)
    sock.connect(endpoint)
    header = FrameHeader(camera_id="cam0", frame_id=frame_id, ts_ns=time.time_ns(), encoding="raw", width=64,
                         height=64, pixel_format="bgr8")
    sock.send_multipart([header.encode(), IMAGE.tobytes()], zmq.NOBLOCK)
    return sock


@pytest.mark.slow
def test_only_the_authorised_camera_reaches_the_decoder(bundles, daemon_factory, broker, curve_env):
    keys = curve_env
    daemon = daemon_factory(bundles[0])
    # One connection per frame: libzmq drops a sender's queue when its handshake is refused (it
    # does not retry after an unknown key, nor after noticing the mechanism mismatch itself).
    senders = zmq.Context()
    plain: list[zmq.Socket] = []
    rogues: list[FramePublisher] = []
    camera = FramePublisher(daemon.endpoint, curve=keys.client("cam1"))
    try:
        with Subscriber(broker.port, f"{PREFIX}/#") as sub:
            for i in range(SENT):
                plain.append(plain_push(senders, daemon.endpoint, f"plain{i:03d}"))
                rogues.append(FramePublisher(daemon.endpoint, context=senders, curve=keys.client("rogue")))
                send_frames(rogues[-1], f"rogue{i:03d}-", 1)
            # A camera without CURVE shows as a mismatch, or as a hang-up if it noticed first.
            wait_for(lambda: refusals(daemon.metrics_port, "unauthorized") == SENT
                     and refusals(daemon.metrics_port, "mechanism_mismatch")
                     + refusals(daemon.metrics_port, "no_detail") == SENT, "refusals counted")
            send_frames(camera, "good", AUTHORISED)
            results = results_by_frame(sub, AUTHORISED, WAIT_S)
            time.sleep(1.0)  # anything that got in would be answered by now
            answered = answers(sub)
            errors = sub.messages(f"{PREFIX}/error")
            frames_received = metric(daemon.metrics_port, "edge_frames_received_total")
            disconnects = metric(daemon.metrics_port, "edge_camera_disconnects_total")
    finally:
        for sock in plain:
            sock.close()
        for publisher in (camera, *rogues):
            publisher.close(linger_ms=0)
        senders.term()
    assert sorted(results) == [f"good{i:03d}" for i in range(AUTHORISED)]
    assert sorted(answered) == sorted(results), "an unauthorised frame was answered"
    assert errors == []
    assert frames_received == AUTHORISED
    assert disconnects == 0, "a refused handshake is not a camera disconnecting"

    # Refused again and again within a minute: one line per peer and reason, the metric has the count.
    refused = log_events(daemon.log_path.read_text(), "camera_refused")
    by_reason = {e["reason"]: e for e in refused}
    assert len(by_reason) == len(refused) and set(by_reason) - {"no_detail"} == {"unauthorized", "mechanism_mismatch"}
    rogue_key = keys.client("rogue").camera_public.decode()
    assert (by_reason["unauthorized"]["address"], by_reason["unauthorized"]["public_key"]) == ("127.0.0.1", rogue_key)
    assert by_reason["mechanism_mismatch"]["endpoint"] == daemon.endpoint


@pytest.mark.slow
def test_replay_with_keys_reaches_the_station_and_sighup_authorises_a_new_camera(
        bundles, hazelnut_dir, daemon_factory, broker, curve_env, capsys):
    keys = curve_env
    daemon = daemon_factory(bundles[0])
    with Subscriber(broker.port, f"{PREFIX}/#") as sub:
        assert main(["replay", str(hazelnut_dir), "--connect", daemon.endpoint, "--limit", "5",
                     "--server-key", str(keys.out / "station.key"),
                     "--camera-key", str(keys.out / "cam1.key_secret")]) == 0, capsys.readouterr().err
        assert sorted(results_by_frame(sub, 5, WAIT_S)) == [f"{i:06d}" for i in range(5)]

        shutil.copy(keys.out / "rogue.key", keys.authorized)
        daemon.send(signal.SIGHUP)
        daemon.wait_for_log('"camera_keys_reloaded"', WAIT_S)
        with FramePublisher(daemon.endpoint, curve=keys.client("rogue")) as newcomer:
            send_frames(newcomer, "new", 3)
            sub.wait_until(f"{PREFIX}/cam0/result", lambda ms: sum(b'"new' in m.payload for m in ms) >= 3, WAIT_S)
    assert refusals(daemon.metrics_port, "unauthorized") == 0


def run_serve(tmp_path: Path, curve: CurveSettings) -> subprocess.CompletedProcess:
    """`edge serve` with `curve`; it must stop at start-up, so no bundle or broker is needed."""
    config = tmp_path / "edge.toml"
    config.write_text(f'bundle = "{tmp_path / "no-bundle"}"\nstate_dir = "{tmp_path / "state"}"\nmetrics_port = 0\n'
                      f'[zmq.curve]\nsecret_key_file = "{curve.secret_key_file}"\n'
                      f'authorized_keys_dir = "{curve.authorized_keys_dir}"\n')
    return subprocess.run([sys.executable, "-m", "edge", "serve", "--config", str(config)], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize(("case", "named"), [
    ("missing secret key file", "secret_key_file: no such file"),
    ("public certificate as the secret one", "holds no secret key"),
    ("empty authorized_keys_dir", "holds no camera certificate"),
    ("missing authorized_keys_dir", "authorized_keys_dir: no such directory"),
])
def test_unusable_curve_settings_stop_the_station_at_start_up(keys, tmp_path, case, named):
    empty = tmp_path / "empty"
    empty.mkdir()
    curve = {
        "missing secret key file": keys.curve().model_copy(update={"secret_key_file": keys.out / "nope.key_secret"}),
        "public certificate as the secret one": keys.curve().model_copy(
            update={"secret_key_file": keys.out / "station.key"}),
        "empty authorized_keys_dir": keys.curve().model_copy(update={"authorized_keys_dir": empty}),
        "missing authorized_keys_dir": keys.curve().model_copy(update={"authorized_keys_dir": tmp_path / "nope"}),
    }[case]
    done = run_serve(tmp_path, curve)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], done.stderr
    path = curve.secret_key_file if "secret" in named else curve.authorized_keys_dir
    assert str(path) in lines[0]


# ---- the pieces ----------------------------------------------------------------------------------

class Recorder:
    """Stands in for the structlog logger: keeps (event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, dict]] = []

    def warning(self, event: str, **fields) -> None:
        self.lines.append((event, fields))

    info = error = warning


def test_camera_auth_refuses_plain_and_unknown_keys_and_rereads_keys_on_request(keys):
    context = zmq.Context()
    counter = Counter("refusals", "test", ["reason"], registry=CollectorRegistry())
    log = Recorder()
    auth = CameraAuth(ZmqSettings(curve=keys.curve()), context, log, counter)
    pull = context.socket(zmq.PULL)
    auth.secure(pull)
    monitor = pull.get_monitor_socket(zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILED)  # as the daemon's
    endpoint = f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}"
    camera_context = zmq.Context()
    disconnects = 0

    def exchange(curve: CurveClientKeys | None) -> bool:
        """Whether a frame from a sender with `curve` gets through; monitor events go to `auth`."""
        nonlocal disconnects
        with FramePublisher(endpoint, context=camera_context, curve=curve) as sender:
            try:
                sender.send_encoded(b"x", "png", 1, 1, "f", timeout_ms=1000)
            except TimeoutError:
                pass  # refused before the send: ZeroMQ has no connection left to queue the frame on
            through = bool(pull.poll(1000))
            if through:
                pull.recv_multipart()
        # Every event of this sender, however busy the machine: drain until the monitor is quiet.
        deadline = time.monotonic() + 10
        while monitor.poll(1000) and time.monotonic() < deadline:
            event = recv_monitor_message(monitor)
            disconnects += not auth.observe(event) and event["event"] == zmq.EVENT_DISCONNECTED
        return through

    try:
        assert exchange(None) is False
        assert exchange(keys.client("rogue")) is False
        assert exchange(keys.client("cam1")) is True
        shutil.copy(keys.out / "rogue.key", keys.authorized)
        auth.request_reload()
        auth.reload_if_requested()
        assert exchange(keys.client("rogue")) is True
    finally:
        pull.close(linger=0)
        monitor.close()
        auth.stop()
        context.term()
        camera_context.term()
    counts = {s.labels["reason"]: s.value for s in counter.collect()[0].samples if s.name.endswith("_total")}
    assert counts["mechanism_mismatch"] + counts["no_detail"] >= 1 and counts["unauthorized"] == 1
    assert counts["cryptographic"] == counts["protocol"] == 0
    assert disconnects == 2, "only the two cameras that got in disconnected"
    refused = [fields for event, fields in log.lines if event == "camera_refused"]
    assert {(f["reason"], f.get("public_key")) for f in refused} - {("no_detail", None), ("mechanism_mismatch", None)} \
        == {("unauthorized", keys.client("rogue").camera_public.decode())}
    assert ("camera_keys_reloaded", {"authorized_cameras": 2, "authorized_keys_dir": str(keys.authorized)}) in log.lines


def test_refusal_log_writes_the_first_refusal_then_one_line_a_minute_with_the_count():
    now = [0.0]
    log = Recorder()
    refusal_log = RefusalLog(log, clock=lambda: now[0])
    for _ in range(600):  # a peer retrying every 100 ms for a minute
        refusal_log.refused("mechanism_mismatch", endpoint="tcp://127.0.0.1:5555")
        now[0] += 0.1
    refusal_log.refused("unauthorized", address="10.0.0.7", public_key="k")  # another peer: its own first line
    refusal_log.refused("mechanism_mismatch", endpoint="tcp://127.0.0.1:5555")
    assert [(fields["reason"], fields["refusals"]) for _, fields in log.lines] == [
        ("mechanism_mismatch", 1), ("unauthorized", 1), ("mechanism_mismatch", 600)]


@pytest.mark.parametrize(("zmq_settings", "exposed"), [
    ({}, False),
    ({"bind": "tcp://127.0.0.1:5555"}, False),
    ({"bind": "tcp://127.3.0.1:5555"}, False),
    ({"bind": "tcp://localhost:5555"}, False),
    ({"bind": "tcp://[::1]:5555"}, False),
    ({"bind": "ipc:///run/edge/frames"}, False),
    ({"bind": "tcp://0.0.0.0:5555"}, True),
    ({"bind": "tcp://*:5555"}, True),
    ({"bind": "tcp://192.168.10.2:5555"}, True),
    ({"bind": "tcp://eth0:5555"}, True),
    ({"bind": "tcp://[::]:5555"}, True),
    ({"bind": "tcp://0.0.0.0:5555", "mode": "sub", "connect": ["tcp://10.0.0.7:5556"]}, False),  # connects out
])
def test_a_network_bind_without_curve_is_exposed(zmq_settings, exposed):
    assert exposed_without_auth(ZmqSettings(**zmq_settings)) is exposed


def test_a_network_bind_with_curve_is_not_exposed_and_an_exposed_one_is_logged_at_start(keys):
    assert exposed_without_auth(ZmqSettings(bind="tcp://0.0.0.0:5555", curve=keys.curve())) is False
    log = Recorder()
    counter = Counter("refusals", "test", ["reason"], registry=CollectorRegistry())
    context = zmq.Context()
    sock = context.socket(zmq.PULL)
    try:
        CameraAuth(ZmqSettings(bind="tcp://0.0.0.0:5555"), context, log, counter).secure(sock)  # never bound
    finally:
        sock.close()
        context.term()
    assert [event for event, _ in log.lines] == ["frames_unauthenticated"]
    assert "anyone on that network can inject frames" in log.lines[0][1]["note"]


def test_edge_keys_writes_a_pair_with_a_private_secret_and_never_overwrites(tmp_path, capsys):
    out = tmp_path / "new" / "keys"
    assert main(["keys", "--out", str(out), "--name", "line1-cam3"]) == 0
    printed = capsys.readouterr().out
    public, secret = out / "line1-cam3.key", out / "line1-cam3.key_secret"
    assert str(public.resolve()) in printed and str(secret.resolve()) in printed
    assert "authorized_keys_dir" in printed and "secret_key_file" in printed
    assert secret.stat().st_mode & 0o777 == 0o600
    assert public.stat().st_mode & 0o777 == 0o644
    public_key, secret_key = zmq.auth.load_certificate(secret)
    assert zmq.auth.load_certificate(public) == (public_key, None) and zmq.curve_public(secret_key) == public_key

    before = secret.read_bytes()
    assert main(["keys", "--out", str(out), "--name", "line1-cam3"]) == 1
    assert "exists: not overwritten" in capsys.readouterr().err
    assert secret.read_bytes() == before


def test_curve_client_keys_want_the_camera_secret_certificate(keys):
    camera = keys.client("cam1")
    assert (camera.server_public, camera.camera_public) == (
        zmq.auth.load_certificate(keys.out / "station.key")[0], zmq.auth.load_certificate(keys.out / "cam1.key")[0])
    with pytest.raises(ValueError, match="no secret key"):
        CurveClientKeys.from_files(keys.out / "station.key", keys.out / "cam1.key")
    with pytest.raises(OSError):
        CurveClientKeys.from_files(keys.out / "missing.key", keys.out / "cam1.key_secret")


def test_replay_wants_both_keys_or_neither(keys, tmp_path, capsys):
    assert main(["replay", str(tmp_path), "--server-key", str(keys.out / "station.key")]) == 2
    assert "--server-key and --camera-key go together" in capsys.readouterr().err

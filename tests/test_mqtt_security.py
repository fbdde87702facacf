"""MQTT over TLS, mutual TLS and with a login, against a real mosquitto on 127.0.0.1 whose
certificates are made here: the link, `edge watch` and `edge serve`."""

import argparse
import datetime
import ipaddress
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from mqtt_broker import Broker, Subscriber, running_link
from structlog.testing import capture_logs

import edge.mqtt.link as link_module
from edge.mqtt.link import MqttLink, read_password_file
from edge.mqtt.outbox import Outbox
from edge.replay import replay
from edge.settings import MqttSettings, SettingsError, TlsSettings
from edge.watch import add_watch_arguments, run_watch
from harness.broker import Listener
from harness.station import READY_TIMEOUT_S, StationProcess
from protocols.messages import LatencyMs, ModelRef, Result, Status

pytestmark = pytest.mark.timeout(60)


# --- certificates ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pki:
    ca: Path  # signs the broker's and the client's certificates
    server_cert: Path  # for IP 127.0.0.1
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # unrelated: a client trusting it must refuse the broker


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
                 issuer_key: ec.EllipticCurvePrivateKey, extensions: list[tuple[x509.ExtensionType, bool]],
                 path: Path) -> x509.Certificate:
    """A certificate valid from an hour ago for a day; `issuer` None: self-signed."""
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer.subject if issuer else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                              critical=False))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    certificate = builder.sign(issuer_key, hashes.SHA256())
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return certificate


def _ca(name: str, folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    path = folder / f"{name}.crt"
    usage = x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False)
    certificate = _certificate(name, key, None, key, [(x509.BasicConstraints(ca=True, path_length=0), True),
                                                      (usage, True)], path)
    return certificate, key, path


def _leaf(name: str, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, folder: Path,
          extensions: list[tuple[x509.ExtensionType, bool]]) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    _certificate(name, key, ca, ca_key, [(x509.BasicConstraints(ca=False, path_length=None), True), *extensions],
                 folder / f"{name}.crt")
    return folder / f"{name}.crt", _write_key(key, folder / f"{name}.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, ca_key, ca_path = _ca("test-ca", folder)
    server_cert, server_key = _leaf("broker", ca, ca_key, folder, [
        (x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)])
    client_cert, client_key = _leaf("station", ca, ca_key, folder, [
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)])
    return Pki(ca=ca_path, server_cert=server_cert, server_key=server_key, client_cert=client_cert,
               client_key=client_key, other_ca=_ca("other-ca", folder)[2])


# --- brokers, links, logs ---------------------------------------------------------------------------

USER, PASSWORD = "station", "correct horse battery"  # spaces: nothing may split the password
STATION = "sec-station"
PREFIX = f"inspection/{STATION}"
CLIENT_ID = "edge-sec-test"  # names paho's thread: paho-mqtt-client-<client id>


@pytest.fixture
def tls_broker(tmp_path, pki):
    """TLS (server certificate only) and logins."""
    listener = Listener(certfile=pki.server_cert, keyfile=pki.server_key, cafile=pki.ca, users={USER: PASSWORD})
    with Broker(tmp_path, listener) as running:
        yield running


@pytest.fixture
def mtls_broker(tmp_path, pki):
    """Mutual TLS: only clients with a certificate signed by the test CA get in."""
    listener = Listener(certfile=pki.server_cert, keyfile=pki.server_key, cafile=pki.ca, require_certificate=True)
    with Broker(tmp_path, listener) as running:
        yield running


@pytest.fixture
def password_file(tmp_path) -> Path:
    path = tmp_path / "mqtt-password"
    path.write_text(PASSWORD + "\n")  # as an editor or `echo` leaves it
    return path


def link_settings(port: int, **overrides) -> MqttSettings:
    return MqttSettings(port=port, client_id=CLIENT_ID, reconnect_min_s=0.1, reconnect_max_s=0.5, **overrides)


def status(state: str) -> Status:
    return Status(state=state, station_id=STATION, ts_ns=time.time_ns())


def result(frame_id: str) -> Result:
    return Result(result_id=f"r-{frame_id}", camera_id="cam0", frame_id=frame_id, part_id=None, verdict="pass",
                  score=0.1, threshold=0.4, ts_capture_ns=1, ts_result_ns=time.time_ns(),
                  latency_ms=LatencyMs(queue=1, decode=1, infer=1, post=1, total=4),
                  model=ModelRef(name="bottle-small", version="1", sha256="ab" * 32), regions=[], mask=None)


def paho_thread_alive() -> bool:
    return any(t.name == f"paho-mqtt-client-{CLIENT_ID}" and t.is_alive() for t in threading.enumerate())


def wait_for_events(logs: list[dict], event: str, count: int, timeout_s: float) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while len(found := [line for line in logs if line["event"] == event]) < count:
        assert time.monotonic() < deadline, f"{len(found)} of {count} {event!r} lines within {timeout_s} s: {logs}"
        time.sleep(0.05)
    return found


def assert_logged_once_and_retried(mqtt_settings: MqttSettings, outbox: Outbox, event: str,
                                   causes: tuple[str, ...], monkeypatch) -> None:
    """The link neither connects nor crashes; it keeps its messages and retries. It logs the failure
    at once, then (the interval cut to 1 s here) one line with the attempts in between."""
    monkeypatch.setattr(link_module, "_FAILURE_LOG_INTERVAL_S", 1.0)
    with capture_logs() as logs, running_link(mqtt_settings, outbox, status) as link:
        link.publish_answers([result(f"{i:06d}") for i in range(3)], [])
        first, second = wait_for_events(logs, event, 2, timeout_s=15)[:2]
        assert first["log_level"] == "error" and any(c in first["cause"].lower() for c in causes), first
        assert first["attempts"] == 1 and second["attempts"] >= 2, (first, second)  # retried, quietly
        assert not link.connected and link.sender_alive and paho_thread_alive()
        assert len(outbox) == 3
        problems = {line["event"] for line in logs if line["log_level"] in ("warning", "error")}
    assert problems == {event}, logs


# --- the link -------------------------------------------------------------------------------------

def test_tls_and_a_password_file_deliver_results(tls_broker, pki, password_file, outbox):
    tls = TlsSettings(ca_certs=pki.ca)
    with Subscriber(tls_broker.port, f"{PREFIX}/#", tls=tls, username=USER, password=PASSWORD) as sub, \
            running_link(link_settings(tls_broker.port, tls=tls, username=USER, password_file=password_file),
                         outbox, status) as link:
        link.publish_answers([result(f"{i:06d}") for i in range(3)], [])
        messages = sub.wait_for(f"{PREFIX}/cam0/result", 3)
        assert link.wait_drained(10)
    assert [Result.model_validate_json(m.payload).frame_id for m in messages] == ["000000", "000001", "000002"]


def test_mutual_tls_delivers_results(mtls_broker, pki, outbox):
    tls = TlsSettings(ca_certs=pki.ca, certfile=pki.client_cert, keyfile=pki.client_key)
    with Subscriber(mtls_broker.port, f"{PREFIX}/#", tls=tls) as sub, \
            running_link(link_settings(mtls_broker.port, tls=tls), outbox, status) as link:
        link.publish_answers([result("000000")], [])
        sub.wait_for(f"{PREFIX}/cam0/result", 1)
        assert link.wait_drained(10)


def test_mutual_tls_without_a_client_certificate_is_logged_and_retried(mtls_broker, pki, outbox, monkeypatch):
    # Under TLS 1.3 the broker refuses only after the handshake: the connection is closed unaccepted.
    # The cause is the broker's "certificate required" alert, or an EOF when its close overtakes it.
    assert_logged_once_and_retried(link_settings(mtls_broker.port, tls=TlsSettings(ca_certs=pki.ca)), outbox,
                                   "mqtt broker closed the connection before accepting it; retrying",
                                   ("certificate required", "eof occurred"), monkeypatch)


def test_a_wrong_ca_is_logged_and_retried_and_no_message_is_lost(tls_broker, pki, password_file, outbox,
                                                                 monkeypatch):
    mqtt_settings = link_settings(tls_broker.port, tls=TlsSettings(ca_certs=pki.other_ca), username=USER,
                                  password_file=password_file)
    assert_logged_once_and_retried(mqtt_settings, outbox, "mqtt TLS handshake failed; retrying",
                                   ("certificate verify failed",), monkeypatch)


def test_a_wrong_password_is_logged_and_retried_and_no_message_is_lost(tls_broker, pki, tmp_path, outbox,
                                                                       monkeypatch):
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not the password\n")
    mqtt_settings = link_settings(tls_broker.port, tls=TlsSettings(ca_certs=pki.ca), username=USER,
                                  password_file=wrong)
    assert_logged_once_and_retried(mqtt_settings, outbox, "mqtt connection refused by the broker; retrying",
                                   ("not authorized", "bad user name or password"), monkeypatch)


def test_the_password_file_loses_one_line_end_only(tmp_path):
    path = tmp_path / "password"
    for written, password in (("pw\n", "pw"), ("pw\r\n", "pw"), ("pw", "pw"), (" pw \n\n", " pw \n")):
        path.write_text(written, newline="")
        assert read_password_file(path) == password


def test_an_unreadable_password_or_tls_file_is_a_settings_error_naming_it(tmp_path, outbox):
    missing = tmp_path / "no-such-password"
    with pytest.raises(SettingsError, match=f"{missing}: No such file"):
        MqttLink(link_settings(1883, username=USER, password_file=missing), PREFIX, STATION, outbox,
                 structlog.get_logger())
    with pytest.raises(SettingsError, match=str(tmp_path / "no-such-ca.crt")):
        MqttLink(link_settings(1883, tls=TlsSettings(ca_certs=tmp_path / "no-such-ca.crt")), PREFIX, STATION,
                 outbox, structlog.get_logger())


def test_a_password_file_needs_a_user_unless_it_is_empty(tmp_path, outbox):
    """The systemd unit always passes a credential file; an empty one means the broker needs no login."""
    credential = tmp_path / "mqtt-password"
    credential.write_text("")
    MqttLink(link_settings(1883, password_file=credential), PREFIX, STATION, outbox, structlog.get_logger())
    credential.write_text("s3cret\n")
    with pytest.raises(SettingsError, match="holds a password but mqtt.username is not set"):
        MqttLink(link_settings(1883, password_file=credential), PREFIX, STATION, outbox, structlog.get_logger())


@pytest.mark.timeout(120)
def test_edge_serve_refuses_to_start_on_an_unreadable_password_file(tmp_path):
    # MqttLink is built before the model loads: the missing bundle is never reached.
    missing = tmp_path / "no-such-password"
    config = tmp_path / "edge.toml"
    config.write_text(f'bundle = "{tmp_path / "no-bundle"}"\nstate_dir = "{tmp_path / "state"}"\nmetrics_port = 0\n'
                      f'[mqtt]\nusername = "{USER}"\npassword_file = "{missing}"\n')
    done = subprocess.run([sys.executable, "-m", "edge", "serve", "--config", str(config)], capture_output=True,
                          text=True, timeout=100)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"edge serve: error: cannot read the MQTT password file {missing}: "
                                        "No such file or directory"]


# --- edge watch -----------------------------------------------------------------------------------

def watch_args(port: int, *options: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_watch_arguments(parser)
    return parser.parse_args(["--port", str(port), "--station", STATION, *options])


def test_edge_watch_prints_verdicts_over_tls_with_a_login(tls_broker, pki, password_file, outbox, capsys):
    stop = threading.Event()
    with running_link(link_settings(tls_broker.port, tls=TlsSettings(ca_certs=pki.ca), username=USER,
                                    password_file=password_file), outbox, status) as link:
        def publish() -> None:
            # Results are not retained: keep sending until the watch (subscribing meanwhile) has one.
            for i in range(200):
                if stop.wait(0.1):
                    return
                link.publish_answers([result(f"{i:06d}")], [])

        publisher = threading.Thread(target=publish)
        publisher.start()
        try:
            code = run_watch(watch_args(tls_broker.port, "--ca-certs", str(pki.ca), "--username", USER,
                                        "--password-file", str(password_file), "--count", "1", "--timeout", "20"))
        finally:
            stop.set()
            publisher.join(5)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert any("PASS" in line and "cam0" in line for line in captured.out.splitlines()), captured.out


@pytest.mark.parametrize("case, cause", [("password", "not authorized"), ("ca", "certificate verify failed")])
def test_edge_watch_with_a_wrong_credential_exits_1_with_one_line(tls_broker, pki, password_file, tmp_path, capsys,
                                                                  case, cause):
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not the password\n")
    started = time.monotonic()
    ca, password = (pki.other_ca, password_file) if case == "ca" else (pki.ca, wrong)
    code = run_watch(watch_args(tls_broker.port, "--ca-certs", str(ca), "--username", USER,
                                "--password-file", str(password), "--timeout", "20"))
    err = capsys.readouterr().err
    assert code == 1
    assert time.monotonic() - started < 10, "it waited for --timeout instead of giving up"
    assert len(err.splitlines()) == 1 and err.startswith("edge watch: error: ") and cause in err.lower(), err


def test_edge_watch_needs_a_client_certificate_for_mutual_tls(mtls_broker, pki, capsys):
    code = run_watch(watch_args(mtls_broker.port, "--ca-certs", str(pki.ca), "--timeout", "20"))
    err = capsys.readouterr().err
    # The cause paho sees varies: the broker's "certificate required" alert, or an EOF when the
    # broker's close overtakes it.
    assert code == 1 and len(err.splitlines()) == 1 and "closed the connection before accepting it" in err, err


# --- edge serve end to end ------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(600)  # the session's bundles are trained and exported first
def test_edge_serve_gives_verdicts_through_a_tls_broker_with_a_login(bundles, hazelnut_dir, tls_broker, pki,
                                                                     password_file, tmp_path):
    settings = {"mqtt": {"username": USER, "password_file": str(password_file), "reconnect_min_s": 0.1,
                         "reconnect_max_s": 1.0},
                "mqtt.tls": {"ca_certs": str(pki.ca)}}  # its own table: the harness writes one level of tables
    station = StationProcess(STATION, bundles[0], tls_broker, tmp_path, tmp_path / "daemon.log", settings)
    with Subscriber(tls_broker.port, f"{PREFIX}/#", tls=TlsSettings(ca_certs=pki.ca), username=USER,
                    password=PASSWORD) as sub:
        station.start()
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not any(Status.model_validate_json(m.payload).state == "online"
                          for m in sub.messages(f"{PREFIX}/status")):
                station.check_running()
                assert time.monotonic() < deadline, f"not online within {READY_TIMEOUT_S} s\n{station.log_tail()}"
                time.sleep(0.2)
            assert replay(hazelnut_dir, station.endpoint, limit=3) == 3
            messages = sub.wait_until(f"{PREFIX}/cam0/result",
                                      lambda ms: {Result.model_validate_json(m.payload).frame_id for m in ms}
                                      >= {"000000", "000001", "000002"}, timeout_s=120)
        finally:
            station.stop()
    assert all(Result.model_validate_json(m.payload).verdict in ("pass", "fail") for m in messages)

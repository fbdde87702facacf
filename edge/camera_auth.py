"""The station side of camera authentication: ZeroMQ CURVE on the frame socket, pyzmq's ZAP
authenticator deciding which camera keys may connect, and the accounting of refused handshakes.

With `zmq.curve` set, the frame socket is a CURVE server (in pull and in sub mode alike: the role
does not depend on bind/connect) and a peer must prove it holds the secret key of a certificate in
`authorized_keys_dir`. ZeroMQ refuses everyone else during the handshake, before any message
exists: a camera without CURVE (mechanism mismatch), with an unknown key (ZAP says 400), or with
another station's public key (the handshake does not decrypt).

What libzmq 4.3.5 reports on the frame socket's monitor, measured. Each failure is followed by
one DISCONNECTED of the same connection (other connections' events may come in between). The
monitor names the station's own endpoint, never the peer: only ZAP requests name the peer, by
address and public key.
  - no CURVE at all:      no ZAP request. HANDSHAKE_FAILED_PROTOCOL (ZMTP_MECHANISM_MISMATCH) when
                          the station notices first (the peer retries ~100 ms later), or
                          HANDSHAKE_FAILED_NO_DETAIL (EPIPE/ECONNRESET) when the peer noticed first
                          and hung up (it gives up): a race, about half and half on loopback
  - an unknown key:       a ZAP request answered 400, then HANDSHAKE_FAILED_AUTH (value 400); the
                          peer gives up (libzmq does not retry a refused handshake)
  - a wrong server key:   HANDSHAKE_FAILED_PROTOCOL (ZMTP_CRYPTOGRAPHIC); the peer retries
  - a TCP connect, closed: HANDSHAKE_FAILED_NO_DETAIL
"""

import ipaddress
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import structlog
import zmq
import zmq.auth
from prometheus_client import Counter
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from edge.settings import ZmqSettings

HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
# The `reason` label of edge_camera_refusals: see the monitor events above.
REFUSAL_REASONS = ("mechanism_mismatch", "unauthorized", "cryptographic", "protocol", "no_detail")
REFUSAL_LOG_INTERVAL_S = 60.0  # a peer refused again and again is logged at most this often
REFUSAL_LOG_PEERS = 1024       # peers remembered for that; the least recently refused is forgotten
LOOPBACK_NAMES = {"localhost", "lo"}


class CameraAuthError(Exception):
    """The CURVE settings cannot be used; the message names the file or directory."""


def exposed_without_auth(settings: ZmqSettings) -> bool:
    """True when the station binds a network address other than loopback without CURVE: then
    anyone who can reach it can inject frames under any camera id."""
    if settings.curve is not None or settings.mode != "pull":
        return False
    transport, _, address = settings.bind.partition("://")
    if transport in ("ipc", "inproc"):
        return False
    host = address.rpartition(":")[0].strip("[]")
    if host in LOOPBACK_NAMES:
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # `*`, an interface name or a host name: assume it is reachable
        return True


class RefusalLog:
    """One log line for the first refusal of a peer for a reason, then at most one every
    REFUSAL_LOG_INTERVAL_S saying how many refusals there were since the last line: a camera
    retrying every 100 ms writes a line a minute, not 600. Used from two threads (ZAP, receiver)."""

    def __init__(self, log: structlog.stdlib.BoundLogger, clock: Callable[[], float] = time.monotonic) -> None:
        self._log = log
        self._clock = clock
        self._lock = threading.Lock()
        self._peers: OrderedDict[tuple, tuple[float, int]] = OrderedDict()  # (last line, refusals since)

    def refused(self, reason: str, **peer: str) -> None:
        key = (reason, *sorted(peer.items()))
        with self._lock:
            last_line, unlogged = self._peers.pop(key, (float("-inf"), 0))
            unlogged += 1
            now = self._clock()
            if now - last_line >= REFUSAL_LOG_INTERVAL_S:
                self._log.warning("camera_refused", reason=reason, refusals=unlogged, **peer)
                last_line, unlogged = now, 0
            self._peers[key] = (last_line, unlogged)
            if len(self._peers) > REFUSAL_LOG_PEERS:
                self._peers.popitem(last=False)


class _Authenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler on its own thread, telling the refusal log whom it turned away."""

    def __init__(self, context: zmq.Context, refusal_log: RefusalLog) -> None:
        super().__init__(context)
        self._refusal_log = refusal_log
        self._request: list[bytes] = []

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self._request = msg  # requests are handled one at a time, on this authenticator's thread
        await super().handle_zap_message(msg)

    def _send_zap_reply(self, request_id: bytes, status_code: bytes, status_text: bytes,
                        user_id: str = "anonymous") -> None:
        super()._send_zap_reply(request_id, status_code, status_text, user_id)
        if status_code != b"200":
            # ZAP request frames: version, request id, domain, address, identity, mechanism, credentials
            request = self._request + [b""] * (7 - len(self._request))
            key = request[6]
            self._refusal_log.refused("unauthorized", address=request[3].decode(errors="replace"),
                                      mechanism=request[5].decode(errors="replace"),
                                      public_key=z85.encode(key).decode() if len(key) == 32 else "",
                                      zap=status_text.decode(errors="replace"))


class CameraAuth:
    """Camera authentication for the station's frame socket. Without `zmq.curve` it only warns
    about an exposed endpoint and accounts for failed handshakes."""

    def __init__(self, settings: ZmqSettings, context: zmq.Context, log: structlog.stdlib.BoundLogger,
                 refusals: Counter) -> None:
        self._settings = settings
        self._log = log
        self._refusals = refusals
        for reason in REFUSAL_REASONS:
            refusals.labels(reason)
        self._refusal_log = RefusalLog(log)
        self._refused_pending = 0  # handshake failures whose DISCONNECTED has not come yet
        self._reload = threading.Event()
        self._keys: tuple[bytes, bytes] | None = None
        self._authenticator: _Authenticator | None = None
        if settings.curve is None:
            return
        self._keys = _station_keys(settings.curve.secret_key_file)
        cameras = _authorized_keys(settings.curve.authorized_keys_dir)
        # Started before the socket binds or connects: ZeroMQ lets a CURVE peer in unchecked while
        # no ZAP handler is bound (libzmq's ZAP_ENFORCE_DOMAIN is a draft option).
        self._authenticator = _Authenticator(context, self._refusal_log)
        self._authenticator.start()
        self._authenticator.configure_curve(domain="*", location=settings.curve.authorized_keys_dir)
        log.info("camera_auth", mechanism="CURVE", station_public_key=self._keys[0].decode(),
                 authorized_cameras=len(cameras), authorized_keys_dir=str(settings.curve.authorized_keys_dir))

    def secure(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE server (before it binds or connects), or warn that it is open."""
        if self._keys is None:
            if exposed_without_auth(self._settings):
                self._log.warning("frames_unauthenticated", bind=self._settings.bind,
                                  note="anyone on that network can inject frames under any camera id: "
                                       "bind 127.0.0.1 or set zmq.curve (`edge keys`)")
            return
        public, secret = self._keys
        sock.curve_server = True
        sock.curve_secretkey = secret
        sock.curve_publickey = public

    def observe(self, event: dict) -> bool:
        """Account for one monitor event of the frame socket; True if it belongs to a refused
        handshake (a failure, or the disconnect of a refused connection): no camera's disconnect."""
        kind = event["event"]
        if kind == zmq.EVENT_DISCONNECTED:
            # Events name no connection: a disconnect pays off a failure; the totals come out exact.
            if self._refused_pending:
                self._refused_pending -= 1
                return True
            return False
        if not kind & HANDSHAKE_FAILED:
            return False
        self._refused_pending += 1
        reason = _refusal_reason(kind, event["value"])
        self._refusals.labels(reason).inc()
        if reason != "unauthorized":  # the authenticator logged that one, naming the peer
            self._refusal_log.refused(reason, endpoint=event["endpoint"].decode(errors="replace"))
        return True

    def request_reload(self) -> None:
        """Re-read the authorised keys at the next `reload_if_requested` (SIGHUP: only sets a flag)."""
        self._reload.set()

    def reload_if_requested(self) -> None:
        """Apply the authorised keys to connections made from now on (a connected camera stays
        connected). A directory that is missing, holds no key or a malformed one is refused, as at
        start-up, and the keys in force stay."""
        if self._authenticator is None or not self._reload.is_set():
            return
        self._reload.clear()
        directory = self._settings.curve.authorized_keys_dir
        try:
            cameras = _authorized_keys(directory)
        except CameraAuthError as err:
            self._log.error("camera_keys_reload_refused", reason=str(err), note="the previous keys stay in force")
            return
        self._authenticator.configure_curve(domain="*", location=directory)
        self._log.info("camera_keys_reloaded", authorized_cameras=len(cameras), authorized_keys_dir=str(directory))

    def stop(self) -> None:
        """Stop the authenticator; only once the frame socket is closed (see __init__)."""
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None


def _refusal_reason(kind: int, value: int) -> str:
    if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return "unauthorized"
    if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return {zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "mechanism_mismatch",
                zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "cryptographic"}.get(value, "protocol")
    return "no_detail"


def _station_keys(path: Path) -> tuple[bytes, bytes]:
    """(public, secret) of the station's secret certificate, checked to be a matching pair."""
    public, secret = _load(path, "zmq.curve.secret_key_file")
    if secret is None:
        raise CameraAuthError(f"zmq.curve.secret_key_file: {path} holds no secret key (a public certificate? "
                              f"use the .key_secret file `edge keys` wrote)")
    if not _is_key(secret) or zmq.curve_public(secret) != public:
        raise CameraAuthError(f"zmq.curve.secret_key_file: {path}: its secret-key is malformed or does not "
                              f"match its public-key")
    return public, secret


def _authorized_keys(directory: Path) -> list[bytes]:
    """The public keys of the cameras' certificates (`*.key`) in `directory`; at least one."""
    if not directory.is_dir():
        raise CameraAuthError(f"zmq.curve.authorized_keys_dir: no such directory: {directory}")
    keys = [_load(path, "zmq.curve.authorized_keys_dir")[0] for path in sorted(directory.glob("*.key"))]
    if not keys:
        raise CameraAuthError(f"zmq.curve.authorized_keys_dir: {directory} holds no camera certificate (*.key): "
                              f"copy each camera's public .key file there")
    return keys


def _load(path: Path, setting: str) -> tuple[bytes, bytes | None]:
    try:
        if not path.is_file():
            raise CameraAuthError(f"{setting}: {'not a file' if path.exists() else 'no such file'}: {path}")
        public, secret = zmq.auth.load_certificate(path)
    except OSError as err:
        raise CameraAuthError(f"{setting}: cannot read {path}: {err.strerror or err}") from None
    except ValueError:
        raise CameraAuthError(f"{setting}: {path} is not a ZeroMQ certificate (no public-key)") from None
    if not _is_key(public):
        raise CameraAuthError(f"{setting}: {path}: malformed public-key (40 Z85 characters expected)")
    return public, secret


def _is_key(key: bytes) -> bool:
    """A CURVE key as certificates hold it: 32 bytes as 40 Z85 characters."""
    try:
        return len(key) == 40 and len(z85.decode(key)) == 32
    except (ValueError, KeyError):  # KeyError: a character outside Z85's alphabet
        return False

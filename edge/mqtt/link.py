"""The MQTT link: one paho client (callback API version 2) plus a sender that drains the outbox.

Delivery is at least once. Results and error reports are written to the outbox first
(`publish_answers`, `publish_error`) and leave it only when the broker acknowledges them (QoS 1
PUBACK). After every (re)connect everything still pending is sent again, oldest first, so a
message can arrive twice: **subscribers de-duplicate on the station-assigned `result_id` /
`error_id`**, which travels with the message in the outbox.

Status: `<prefix>/status` is retained. The Last Will says `offline` (crash, power cut, lost
network); `online` (with the model identity) is published after every connect; `stop` publishes
`offline` on a graceful shutdown, when the broker discards the Will. The daemon replaces the
status (`set_status`) when its state changes (degraded, draining, faulted, a new model).

Threads:
- caller threads (the daemon): `start`, `publish_answers`, `publish_error`, `set_status`,
  `wait_drained`, `stop`.
- paho's network thread (`loop_start`): `_on_connect`, `_on_disconnect`, `_on_publish`,
  `_on_connect_fail`. They only flip flags and publish the status, never touch the disk; they
  alone touch the failure-log state (`_failure_*`, `_refused`, `_paho_error`), without a lock.
- the sender thread (`mqtt-sender`): reads the outbox, calls `client.publish`, removes what was
  acknowledged.
Lock order: paho runs `on_publish` holding its outgoing-message lock and that callback takes
`_cond`, so nothing may call `client.publish` while holding `_cond`. `_status_lock` (taken
before paho's lock, never with `_cond` held) orders status publications so the last one wins.

Failed connection attempts are logged with their cause, and paho goes on retrying with backoff.
Each kind (broker unreachable, TLS handshake failed, refused by the broker, closed before being
accepted) is logged at once, then, while it persists, at most once a minute with the latest cause
and the number of failed attempts since the last line.
"""

import logging
import sqlite3
import ssl
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge.mqtt.outbox import Outbox
from edge.settings import MqttSettings, SettingsError, TlsSettings
from protocols.messages import ErrorReport, Result, Status, error_topic, result_topic, status_topic

# How long `stop` waits for the broker to acknowledge the final `offline` status.
_OFFLINE_ACK_TIMEOUT_S = 5.0
# Pause before the sender retries after an outbox (disk) error.
_OUTBOX_RETRY_S = 1.0
# MQTT 5's default when the broker's CONNACK names no Receive Maximum.
_DEFAULT_RECEIVE_MAXIMUM = 65535
# While connecting keeps failing the same way, one log line at most this often.
_FAILURE_LOG_INTERVAL_S = 60.0


def read_password_file(path: Path) -> str:
    """The password in `path` without its line end; SettingsError naming the file if it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SettingsError(f"cannot read the MQTT password file {path}: "
                            f"{getattr(err, 'strerror', None) or err}") from None
    return text.removesuffix("\n").removesuffix("\r")  # editors end the line; the password does not


def configure_security(client: mqtt.Client, tls: TlsSettings | None, username: str | None,
                       password: str | None) -> None:
    """TLS (when `tls` is given) and the login of `client`; SettingsError naming the files TLS
    cannot load. Shared by the daemon and `edge watch`."""
    if tls is not None:
        try:
            client.tls_set(ca_certs=str(tls.ca_certs) if tls.ca_certs else None,
                           certfile=str(tls.certfile) if tls.certfile else None,
                           keyfile=str(tls.keyfile) if tls.keyfile else None)
        except OSError as err:  # a missing or unusable file (ssl.SSLError is an OSError)
            files = ", ".join(str(f) for f in (tls.ca_certs, tls.certfile, tls.keyfile) if f)
            raise SettingsError(f"cannot load the MQTT TLS files ({files}): {err.strerror or err}") from None
    if username is not None:
        client.username_pw_set(username, password)


class _LastError(logging.Handler):
    """Keeps paho's last error message: paho tells only its logger why it dropped a connection."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.message: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.message = record.getMessage()


def _json_properties(packet_type: int) -> Properties:
    """MQTT 5 extras for JSON payloads; the payloads themselves stay self-contained."""
    properties = Properties(packet_type)
    properties.PayloadFormatIndicator = 1  # UTF-8
    properties.ContentType = "application/json"
    return properties


class MqttLink:
    def __init__(self, settings: MqttSettings, prefix: str, station_id: str, outbox: Outbox,
                 logger) -> None:
        self._settings = settings
        self._prefix = prefix
        self._outbox = outbox
        self._log = logger.bind(component="mqtt")
        self.published_total = 0  # outbox messages handed to paho, resends included
        self.acked_total = 0  # outbox messages acknowledged by the broker

        mqtt5 = settings.protocol == "5"
        self._client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=settings.client_id or f"edge-{station_id}",
            protocol=mqtt.MQTTv5 if mqtt5 else mqtt.MQTTv311)
        self._publish_properties = _json_properties(PacketTypes.PUBLISH) if mqtt5 else None
        will = Status(state="offline", station_id=station_id, ts_ns=time.time_ns())
        self._client.will_set(status_topic(prefix), will.encode(), qos=1, retain=True,
                              properties=_json_properties(PacketTypes.WILLMESSAGE) if mqtt5 else None)
        # Files are read now, so that the daemon refuses to start on a bad one.
        password = settings.password
        if settings.password_file is not None:
            password = read_password_file(settings.password_file)
            # The systemd unit always hands over a credential file: empty means "no login".
            if password and settings.username is None:
                raise SettingsError(f"mqtt.password_file {settings.password_file} holds a password "
                                    "but mqtt.username is not set")
        configure_security(self._client, settings.tls, settings.username, password)
        self._client.reconnect_delay_set(settings.reconnect_min_s, settings.reconnect_max_s)
        # The sender bounds what is in flight (per connection, see _on_connect); paho's own limit
        # (default 20) would only add a second, hidden queue.
        self._client.max_inflight_messages_set(0)
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        # A logger of its own (outside the process's logging tree), at ERROR: paho's debug lines cost
        # nothing, and its last error names why a broker closed a connection before accepting it.
        self._paho_error = _LastError()
        paho_logger = logging.Logger("paho")
        paho_logger.setLevel(logging.ERROR)
        paho_logger.addHandler(self._paho_error)
        self._client.enable_logger(paho_logger)

        self._refused = False  # the broker's CONNACK refused this connection (logged already)
        self._failure_kind: str | None = None  # event of the last failure line; None once connected
        self._failure_logged = 0.0  # time.monotonic() of that line
        self._failures = 0  # failed attempts since that line

        self._status_lock = threading.Lock()
        self._online: Status | None = None  # published after each connect
        self._status_final = False  # `offline` went out: no more `online`

        self._cond = threading.Condition()
        self._connected = False
        self._connection = 0  # counts successful connects; a new one means "resend all pending"
        self._window = settings.max_inflight  # unacknowledged messages allowed on this connection
        self._more_pending = True  # the outbox may hold messages not yet sent on this connection
        self._acks: list[tuple[int, ReasonCode]] = []  # (mid, reason) from on_publish, for the sender
        self._started = False
        self._stopping = False
        self._sender = threading.Thread(target=self._send_loop, name="mqtt-sender", daemon=True)

    @property
    def connected(self) -> bool:
        """Connected and the `online` status sent."""
        return self._connected

    def start(self, online: Status) -> None:
        """Connect in the background and return at once: the broker may well be down."""
        with self._cond:
            if self._started:
                raise RuntimeError("MqttLink.start() may be called only once")
            self._started = True
        with self._status_lock:
            self._online = online
        self._sender.start()
        self._client.connect_async(self._settings.host, self._settings.port, self._settings.keepalive_s)
        self._client.loop_start()
        self._log.info("mqtt starting", host=self._settings.host, port=self._settings.port,
                       protocol=self._settings.protocol)

    @property
    def sender_alive(self) -> bool:
        """False once the outbox sender thread has ended (after `stop`, or if it died)."""
        return self._sender.is_alive()

    def set_status(self, status: Status) -> None:
        """Replace the status published after each connect (a new state or model); publish it now."""
        with self._status_lock:
            self._online = status
            if self._client.is_connected() and not self._status_final:
                self._publish_status(status)

    def publish_answers(self, answers: list[Result | ErrorReport], settle: list[int]) -> None:
        """Queue the answers to a batch of frames and settle their journal rows, in one outbox
        transaction: on disk when this returns, sent as soon as possible."""
        self._outbox.put_answers([(self._topic(a), a.encode()) for a in answers], settle)
        self._wake_sender()

    def publish_error(self, report: ErrorReport) -> None:
        """Queue an error report: through the outbox too, MES counts them."""
        self._outbox.put(error_topic(self._prefix), report.encode(), qos=1)
        self._wake_sender()

    def wait_drained(self, timeout_s: float) -> bool:
        """Block until the outbox is empty; False if it still is not after `timeout_s`."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._outbox) == 0, timeout_s)

    def stop(self, offline: Status) -> None:
        """Stop sending, publish `offline` (retained), disconnect. Idempotent. Pending messages
        stay in the outbox for the next start."""
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            self._cond.notify_all()
        if self._sender.is_alive():
            self._sender.join()
        with self._status_lock:
            self._status_final = True
            sent = self._publish_status(offline) if self._client.is_connected() else None
        if sent is not None:
            try:
                sent.wait_for_publish(_OFFLINE_ACK_TIMEOUT_S)
            except (RuntimeError, ValueError):
                pass  # connection lost meanwhile: the broker published the Will instead
            if not sent.is_published():
                self._log.warning("mqtt offline status not acknowledged")
        self._client.disconnect()
        self._client.loop_stop()
        self._log.info("mqtt stopped", pending=len(self._outbox))

    # --- called from caller threads -----------------------------------------------------------

    def _topic(self, answer: Result | ErrorReport) -> str:
        return result_topic(self._prefix, answer.camera_id) if isinstance(answer, Result) else error_topic(self._prefix)

    def _wake_sender(self) -> None:
        with self._cond:
            self._more_pending = True
            self._cond.notify_all()

    def _publish_status(self, status: Status) -> mqtt.MQTTMessageInfo:
        # Caller holds _status_lock.
        return self._client.publish(status_topic(self._prefix), status.encode(), qos=1, retain=True,
                                    properties=self._publish_properties)

    # --- paho's network thread ------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata, flags, reason_code: ReasonCode,
                    properties: Properties) -> None:
        if reason_code.is_failure:
            # e.g. "Not authorized", "Bad user name or password"; the broker closes the connection
            # and paho retries with backoff.
            self._connect_failed("mqtt connection refused by the broker; retrying", str(reason_code), error=True)
            self._refused = True
            return
        self._failure_kind, self._failures = None, 0
        # paho would resend its in-memory copies of unacknowledged messages; the outbox resends
        # them instead, so drop paho's to avoid a second duplicate of each.
        client.drop_out_messages()
        # paho does not honour the broker's Receive Maximum (mosquitto announces 20) and exceeding
        # it is a protocol error, so the sender does; one slot stays free for status messages.
        receive_maximum = getattr(properties, "ReceiveMaximum", _DEFAULT_RECEIVE_MAXIMUM)
        window = max(1, min(self._settings.max_inflight, receive_maximum - 1))
        with self._status_lock:
            if self._online is not None and not self._status_final:
                self._publish_status(self._online)
        with self._cond:
            self._connected = True
            self._connection += 1
            self._window = window
            self._more_pending = True
            self._cond.notify_all()
        self._log.info("mqtt connected", host=self._settings.host, port=self._settings.port,
                       inflight_window=window)

    def _on_connect_fail(self, client: mqtt.Client, userdata) -> None:
        # paho (2.2) passes no exception, but calls this from inside its `except OSError` block
        # around connecting (`loop_forever`), so the exception being handled is the cause.
        err = sys.exc_info()[1]  # sys.exception() from Python 3.11 on
        cause = "unknown" if err is None else str(err) or type(err).__name__
        if isinstance(err, ssl.SSLError):  # e.g. "certificate verify failed": a wrong CA or host
            self._connect_failed("mqtt TLS handshake failed; retrying", cause, error=True)
        else:
            self._connect_failed("mqtt broker unreachable; retrying", cause)

    def _connect_failed(self, event: str, cause: str, error: bool = False) -> None:
        """Log a failed attempt: at once when its kind (`event`) is new, else at most every
        _FAILURE_LOG_INTERVAL_S, with the number of failed attempts since the last line."""
        self._failures += 1
        now = time.monotonic()
        if event == self._failure_kind and now - self._failure_logged < _FAILURE_LOG_INTERVAL_S:
            return
        log = self._log.error if error else self._log.warning
        log(event, cause=cause, attempts=self._failures, host=self._settings.host, port=self._settings.port)
        self._failure_kind, self._failure_logged, self._failures = event, now, 0

    def _on_disconnect(self, client: mqtt.Client, userdata, flags, reason_code: ReasonCode,
                       properties: Properties) -> None:
        with self._cond:
            was_connected = self._connected
            self._connected = False
            self._cond.notify_all()
        paho_error, self._paho_error.message = self._paho_error.message, None
        refused, self._refused = self._refused, False
        if self._stopping or refused:
            return
        if was_connected:
            self._log.warning("mqtt connection lost; reconnecting", reason=str(reason_code))
        else:
            # Closed before a CONNACK, e.g. a broker that wants a client certificate it trusts says
            # so only after the TLS 1.3 handshake, when it reads the first message.
            self._connect_failed("mqtt broker closed the connection before accepting it; retrying",
                                 paho_error or str(reason_code), error=True)

    def _on_publish(self, client: mqtt.Client, userdata, mid: int, reason_code: ReasonCode,
                    properties: Properties) -> None:
        with self._cond:
            self._acks.append((mid, reason_code))
            self._cond.notify_all()

    # --- the sender thread ----------------------------------------------------------------------

    def _send_loop(self) -> None:
        in_flight: dict[int, int] = {}  # paho mid -> outbox id; only this thread touches it
        cursor = 0  # highest outbox id sent on the current connection
        connection = 0

        def has_work() -> bool:
            return (self._stopping or bool(self._acks) or self._connection != connection
                    or (self._connected and self._more_pending and len(in_flight) < self._window))

        while True:
            with self._cond:
                self._cond.wait_for(has_work)
                if self._stopping:
                    return
                acks, self._acks = self._acks, []
                latest_connection = self._connection
            self._settle(acks, in_flight)
            if latest_connection != connection:
                # The broker forgot what was in flight on the old connection: start over.
                in_flight.clear()
                cursor = 0
                connection = latest_connection
            with self._cond:
                room = self._window - len(in_flight)
                if not (self._connected and self._more_pending and room > 0
                        and self._connection == connection):
                    continue
                self._more_pending = False  # cleared before reading, so a concurrent put re-arms it
            try:
                batch = self._outbox.pending(room, after_id=cursor)
            except sqlite3.Error:
                self._log.exception("outbox unreadable; retrying")
                with self._cond:
                    self._more_pending = True
                    self._cond.wait_for(lambda: self._stopping, _OUTBOX_RETRY_S)
                continue
            if len(batch) == room:
                with self._cond:
                    self._more_pending = True  # the window filled up: there may be more
            for message in batch:
                info = self._client.publish(message.topic, message.payload, qos=message.qos,
                                            retain=message.retain, properties=self._publish_properties)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    break  # connection gone; the next connection resends from the start
                in_flight[info.mid] = message.id
                cursor = message.id
                self.published_total += 1

    def _settle(self, acks: list[tuple[int, ReasonCode]], in_flight: dict[int, int]) -> None:
        """Remove acknowledged messages from the outbox."""
        removed = False
        for mid, reason_code in acks:
            message_id = in_flight.pop(mid, None)
            if message_id is None:
                continue  # a status message, or a mid from a connection already given up
            if reason_code.is_failure:
                # Refused (MQTT 5 only, e.g. not authorised): keep it; it is sent again on the
                # next connection, and wait_drained keeps reporting a non-empty outbox.
                self._log.error("mqtt broker refused a message", reason=str(reason_code),
                                outbox_id=message_id)
                continue
            try:
                self._outbox.remove(message_id)
            except sqlite3.Error:
                self._log.exception("outbox remove failed; the message will be sent again",
                                    outbox_id=message_id)
                continue
            removed = True
            self.acked_total += 1
        if removed:
            with self._cond:
                self._cond.notify_all()  # wake wait_drained

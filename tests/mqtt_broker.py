"""Test helpers: the harness's mosquitto (the test skips where it is not installed), and an MQTT 5
subscriber that collects messages per topic and keeps its session across broker restarts (over
TLS and with a login where the broker's listener asks for them)."""

import threading
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.mqtt.link import MqttLink
from edge.mqtt.outbox import Outbox
from edge.settings import MqttSettings, TlsSettings
from harness.broker import Listener, MosquittoBroker, find_mosquitto
from harness.broker import free_port as _free_port  # noqa: F401 (tests import it from here)
from protocols.messages import Status

SUBSCRIBE_TIMEOUT_S = 5.0


@contextmanager
def running_link(settings: MqttSettings, outbox: Outbox, status: Callable[[str], Status]):
    """An MqttLink for `status`'s station: started with status("online"), stopped with status("offline")."""
    station = status("online").station_id
    link = MqttLink(settings, f"inspection/{station}", station, outbox, structlog.get_logger())
    link.start(status("online"))
    try:
        yield link
    finally:
        link.stop(status("offline"))


def mosquitto_path() -> str:
    """The mosquitto binary, or skip the test."""
    path = find_mosquitto()
    if path is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto): MQTT tests need a real broker")
    return path


class Broker(MosquittoBroker):
    """`with Broker(tmp_path) as broker:` runs mosquitto on `broker.port` until the block ends;
    `stop()`/`start()` take it away and bring it back on the same port, sessions kept."""

    def __init__(self, workdir: Path, listener: Listener = Listener()) -> None:
        mosquitto_path()
        super().__init__(workdir, listener)


class Subscriber:
    """An MQTT 5 subscriber on a background loop, with a session that outlives reconnects.

    `with Subscriber(port, "inspection/#") as sub: sub.wait_for("inspection/s/status", 1)`.
    """

    def __init__(self, port: int, topic_filter: str, session_expiry_s: int = 900, tls: TlsSettings | None = None,
                 username: str | None = None, password: str | None = None) -> None:
        self.port = port
        self._filter = topic_filter
        self._cond = threading.Condition()
        self._messages: dict[str, list[mqtt.MQTTMessage]] = {}
        self._subscribed = False
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sub-{uuid.uuid4().hex[:12]}",
                                   protocol=mqtt.MQTTv5)
        self._client.reconnect_delay_set(0.1, 0.5)
        if tls is not None:
            self._client.tls_set(ca_certs=tls.ca_certs, certfile=tls.certfile, keyfile=tls.keyfile)
        if username is not None:
            self._client.username_pw_set(username, password)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._connect_properties = Properties(PacketTypes.CONNECT)
        self._connect_properties.SessionExpiryInterval = session_expiry_s

    def __enter__(self) -> "Subscriber":
        # Clean start off from the first connect: mosquitto 2.0.11 does not restore, after a restart,
        # a session that began with clean start on, whatever its expiry (measured), and the station's
        # backlog would then be routed before this subscriber has subscribed again.
        self._client.connect_async("127.0.0.1", self.port, keepalive=5, clean_start=False,
                                   properties=self._connect_properties)
        self._client.loop_start()
        with self._cond:
            if not self._cond.wait_for(lambda: self._subscribed, SUBSCRIBE_TIMEOUT_S):
                self.close()
                raise TimeoutError(f"subscriber could not subscribe to {self._filter!r}")
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def messages(self, topic: str) -> list[mqtt.MQTTMessage]:
        with self._cond:
            return list(self._messages.get(topic, []))

    def wait_for(self, topic: str, count: int, timeout_s: float = 10.0) -> list[mqtt.MQTTMessage]:
        """The first `count` messages on `topic`; AssertionError if they do not arrive in time."""
        with self._cond:
            arrived = self._cond.wait_for(lambda: len(self._messages.get(topic, [])) >= count, timeout_s)
            received = list(self._messages.get(topic, []))
        assert arrived, f"{len(received)} of {count} messages on {topic} within {timeout_s}s"
        return received[:count]

    def wait_until(self, topic: str, predicate, timeout_s: float = 10.0) -> list[mqtt.MQTTMessage]:
        """All messages on `topic` once `predicate(messages)` holds; AssertionError on timeout."""
        with self._cond:
            held = self._cond.wait_for(lambda: predicate(self._messages.get(topic, [])), timeout_s)
            received = list(self._messages.get(topic, []))
        assert held, f"condition not met within {timeout_s}s; {len(received)} messages on {topic}"
        return received

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        # A resumed session keeps its subscription; subscribing again would replay retained messages.
        if not reason_code.is_failure and not flags.session_present:
            client.subscribe(self._filter, qos=1)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._cond:
            self._subscribed = True
            self._cond.notify_all()

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self._messages.setdefault(message.topic, []).append(message)
            self._cond.notify_all()

"""Test helpers: a real mosquitto on 127.0.0.1 that can be stopped and restarted on the same port,
and a subscriber that collects messages per topic.

The broker persists (into its own temp dir) so that a subscriber's session and subscriptions
survive `stop()`/`start()`: without that, the link under test could re-deliver its backlog before
the subscriber has re-subscribed, and outage tests would race.
"""

import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

_START_TIMEOUT_S = 5.0
_STOP_TIMEOUT_S = 5.0


def mosquitto_path() -> str:
    """The mosquitto binary, or skip the test."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    path = shutil.which("mosquitto", path=search)
    if path is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto): MQTT tests need a real broker")
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Broker:
    """`with Broker(tmp_path) as broker:` runs mosquitto on `broker.port` until the block ends."""

    def __init__(self, workdir: Path) -> None:
        self._binary = mosquitto_path()
        self.port = _free_port()
        self._dir = workdir / f"mosquitto-{self.port}"
        self._dir.mkdir(parents=True)
        self._config = self._dir / "mosquitto.conf"
        self._config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self._dir}/\n"
            f"log_dest file {self._dir}/mosquitto.log\n")
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        self._process = subprocess.Popen([self._binary, "-c", str(self._config)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self._process.returncode}: {self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on port {self.port} within {_START_TIMEOUT_S}s")

    def stop(self) -> None:
        """SIGTERM (mosquitto saves its sessions), SIGKILL if it hangs."""
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(_STOP_TIMEOUT_S)
        self._process = None

    def log(self) -> str:
        path = self._dir / "mosquitto.log"
        return path.read_text()[-2000:] if path.exists() else "(no log)"

    def __enter__(self) -> "Broker":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


class Subscriber:
    """An MQTT 5 subscriber on a background loop, with a session that outlives reconnects.

    `with Subscriber(port, "inspection/#") as sub: sub.wait_for("inspection/s/status", 1)`.
    """

    def __init__(self, port: int, topic_filter: str, session_expiry_s: int = 60) -> None:
        self.port = port
        self._filter = topic_filter
        self._cond = threading.Condition()
        self._messages: dict[str, list[mqtt.MQTTMessage]] = {}
        self._subscribed = False
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sub-{uuid.uuid4().hex[:12]}",
                                   protocol=mqtt.MQTTv5)
        self._client.reconnect_delay_set(0.1, 0.5)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._connect_properties = Properties(PacketTypes.CONNECT)
        self._connect_properties.SessionExpiryInterval = session_expiry_s

    def __enter__(self) -> "Subscriber":
        self._client.connect_async("127.0.0.1", self.port, keepalive=5, properties=self._connect_properties)
        self._client.loop_start()
        with self._cond:
            if not self._cond.wait_for(lambda: self._subscribed, _START_TIMEOUT_S):
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

"""A subscriber to one station's topics, as a PLC or a dashboard would be."""

import queue

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from protocols.messages import error_topic, result_topic, status_topic


class Feed:
    """Subscribes (QoS 1) to the results, status and errors under `prefix`; messages wait in
    `inbox`. MQTT 3.1.1, which both brokers speak."""

    def __init__(self, port: int, prefix: str) -> None:
        self.inbox: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._port = port
        self._prefix = prefix
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self._client.on_connect = self._on_connect
        self._client.on_message = lambda client, userdata, message: self.inbox.put(message)

    def start(self) -> None:
        self._client.connect("127.0.0.1", self._port)
        self._client.loop_start()

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata, flags, reason_code, properties) -> None:
        # On every connect: a clean session forgets its subscriptions.
        if not reason_code.is_failure:
            client.subscribe([(result_topic(self._prefix, "+"), 1), (status_topic(self._prefix), 1),
                              (error_topic(self._prefix), 1)])

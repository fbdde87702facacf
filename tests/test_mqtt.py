"""The MQTT side against a real mosquitto: outbox durability, delivery, status and Will, outages."""

import json
import signal
import subprocess
import sys
import textwrap
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from edge.mqtt.outbox import Outbox, OutboxError
from edge.settings import MqttSettings
from protocols.messages import LatencyMs, ModelRef, Result, Status, result_topic, status_topic
from harness.broker import _ephemeral_range, free_port
from mqtt_broker import Broker, Subscriber, running_link

pytestmark = pytest.mark.timeout(60)

STATION = "test-station"
PREFIX = f"inspection/{STATION}"
RESULTS = f"{PREFIX}/+/result"
CAM = "cam0"


def model(version: str = "1") -> ModelRef:
    return ModelRef(name="bottle-small", version=version, sha256="ab" * 32)


def status(state: str, version: str = "1") -> Status:
    return Status(state=state, station_id=STATION, model=model(version), backend="exported-cpu",
                  ts_ns=time.time_ns())


def result(frame_id: str, camera_id: str = CAM) -> Result:
    return Result(result_id=f"r-{camera_id}-{frame_id}", camera_id=camera_id, frame_id=frame_id, part_id=None,
                  verdict="pass", score=0.1,
                  threshold=0.4, ts_capture_ns=1, ts_result_ns=2,
                  latency_ms=LatencyMs(queue=1, decode=1, infer=1, post=1, total=4),
                  model=model(), regions=[], mask=None)


def settings(port: int, **overrides) -> MqttSettings:
    return MqttSettings(port=port, reconnect_min_s=0.1, reconnect_max_s=0.5, **overrides)


def frame_ids(messages) -> list[str]:
    return [json.loads(m.payload)["frame_id"] for m in messages]


def states(messages) -> list[str]:
    return [json.loads(m.payload)["state"] for m in messages]


@pytest.fixture
def broker(tmp_path):
    with Broker(tmp_path) as running:
        yield running


# --- outbox --------------------------------------------------------------------------------------

def test_outbox_survives_reopening(tmp_path):
    box = Outbox(tmp_path)
    ids = [box.put(f"t/{i}", f"payload {i}".encode()) for i in range(3)]
    box.close()

    box = Outbox(tmp_path)
    pending = box.pending(10)
    assert [m.id for m in pending] == ids
    assert [(m.topic, m.payload, m.qos, m.retain) for m in pending] == [
        (f"t/{i}", f"payload {i}".encode(), 1, False) for i in range(3)]
    box.remove(ids[1])
    assert [m.id for m in box.pending(10)] == [ids[0], ids[2]]
    assert [m.id for m in box.pending(10, after_id=ids[0])] == [ids[2]]
    assert len(box) == 2
    box.close()


def test_outbox_ids_never_repeat_after_emptying(outbox):
    first = outbox.put("t", b"x")
    outbox.remove(first)
    assert outbox.put("t", b"y") > first


def test_outbox_concurrent_put_and_remove(outbox):
    count = 100

    def producer() -> None:
        for i in range(count):
            outbox.put("t", str(i).encode())

    thread = threading.Thread(target=producer)
    thread.start()
    removed: list[bytes] = []
    deadline = time.monotonic() + 30
    while len(removed) < count and time.monotonic() < deadline:
        for message in outbox.pending(10):
            outbox.remove(message.id)
            removed.append(message.payload)
    thread.join(5)
    assert removed == [str(i).encode() for i in range(count)]
    assert len(outbox) == 0


def test_outbox_unusable_file_is_named(tmp_path):
    (tmp_path / Outbox.FILENAME).write_bytes(b"this is not a database" * 100)
    with pytest.raises(OutboxError, match=str(tmp_path / Outbox.FILENAME)):
        Outbox(tmp_path)


# --- link against a real broker ------------------------------------------------------------------

def test_results_are_delivered_in_order_and_leave_the_outbox(broker, outbox):
    sent = [f"{i:06d}" for i in range(50)]
    with Subscriber(broker.port, RESULTS) as sub, running_link(settings(broker.port), outbox, status) as link:
        for frame_id in sent:
            link.publish_answers([result(frame_id)], [])
        received = sub.wait_for(result_topic(PREFIX, CAM), len(sent))
        assert link.wait_drained(5)
    assert frame_ids(received) == sent
    assert {m.qos for m in received} == {1}
    assert received[0].properties.ContentType == "application/json"
    assert len(outbox) == 0
    assert link.acked_total == len(sent)


def test_status_online_model_swap_and_offline(broker, outbox):
    topic = status_topic(PREFIX)
    with Subscriber(broker.port, topic) as early:
        with running_link(settings(broker.port), outbox, status) as link:
            assert states(early.wait_for(topic, 1)) == ["online"]
            with Subscriber(broker.port, topic) as late:
                first = late.wait_for(topic, 1)[0]
                assert first.retain and json.loads(first.payload)["state"] == "online"

            link.set_status(status("online", version="2"))
            early.wait_until(topic, lambda ms: any(json.loads(m.payload)["model"]["version"] == "2" for m in ms))
        early.wait_until(topic, lambda ms: states(ms)[-1:] == ["offline"])
    with Subscriber(broker.port, topic) as late:
        last = late.wait_for(topic, 1)[0]
        assert last.retain and json.loads(last.payload)["state"] == "offline"
    link.stop(status("offline"))  # idempotent: nothing more is published
    assert states(early.messages(topic))[-1] == "offline"


LINK_PROCESS = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import structlog
    from edge.mqtt.link import MqttLink
    from edge.mqtt.outbox import Outbox
    from edge.settings import MqttSettings
    from protocols.messages import Status

    port, state_dir, prefix, station = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    link = MqttLink(MqttSettings(port=port, keepalive_s=1), prefix, station, Outbox(state_dir),
                    structlog.get_logger())
    link.start(Status(state="online", station_id=station, ts_ns=time.time_ns()))
    time.sleep(60)
""")


def test_last_will_says_offline_when_the_process_is_killed(broker, tmp_path):
    topic = status_topic(PREFIX)
    with Subscriber(broker.port, topic) as sub:
        process = subprocess.Popen(
            [sys.executable, "-c", LINK_PROCESS, str(broker.port), str(tmp_path / "state"), PREFIX, STATION],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            try:
                sub.wait_until(topic, lambda ms: states(ms) == ["online"], timeout_s=20)
            except AssertionError:
                process.kill()
                raise AssertionError(f"link process never came online: {process.communicate(timeout=5)[1][-2000:]!r}")
            process.send_signal(signal.SIGKILL)
            process.wait(5)
            messages = sub.wait_for(topic, 2, timeout_s=5)
        finally:
            process.kill()
            process.wait(5)
    assert states(messages) == ["online", "offline"]
    assert json.loads(messages[1].payload)["station_id"] == STATION


@pytest.mark.slow
def test_no_result_is_lost_across_a_broker_outage(broker, outbox):
    sent: list[str] = []
    with Subscriber(broker.port, RESULTS) as sub, running_link(settings(broker.port), outbox, status) as link:
        def put(count: int, pause_s: float = 0.0) -> None:
            for _ in range(count):
                sent.append(f"{len(sent):06d}")
                link.publish_answers([result(sent[-1])], [])
                time.sleep(pause_s)

        put(10)
        sub.wait_for(result_topic(PREFIX, CAM), 10)
        broker.stop()
        put(20, pause_s=0.1)  # ~2 s of results while the broker is away
        assert not link.connected and len(outbox) > 0
        broker.start()
        put(10)
        sub.wait_until(result_topic(PREFIX, CAM), lambda ms: set(frame_ids(ms)) >= set(sent), timeout_s=20)
        assert link.wait_drained(10)
    assert set(frame_ids(sub.messages(result_topic(PREFIX, CAM)))) == set(sent)
    assert len(outbox) == 0


def test_pending_messages_are_sent_when_a_link_starts_while_the_broker_is_down(broker, tmp_path):
    state_dir = tmp_path / "state"
    previous_run = Outbox(state_dir)
    for i in range(5):
        previous_run.put(result_topic(PREFIX, CAM), result(f"{i:06d}").encode())
    previous_run.close()

    outbox = Outbox(state_dir)
    with Subscriber(broker.port, RESULTS) as sub:
        broker.stop()
        began = time.monotonic()
        with running_link(settings(broker.port), outbox, status) as link:
            assert time.monotonic() - began < 1, "start() must not wait for the broker"
            assert not link.connected
            broker.start()
            expected = {f"{i:06d}" for i in range(5)}
            received = sub.wait_until(result_topic(PREFIX, CAM), lambda ms: set(frame_ids(ms)) >= expected,
                                      timeout_s=15)
            assert link.wait_drained(5)
    assert set(frame_ids(received)) == expected
    assert len(outbox) == 0
    outbox.close()


def test_mqtt_3_1_1_is_selectable(broker, outbox):
    sent = [f"{i:06d}" for i in range(10)]
    with Subscriber(broker.port, RESULTS) as sub, \
            running_link(settings(broker.port, protocol="3.1.1"), outbox, status) as link:
        for frame_id in sent:
            link.publish_answers([result(frame_id)], [])
        received = sub.wait_for(result_topic(PREFIX, CAM), len(sent))
        assert link.wait_drained(5)
    assert frame_ids(received) == sent
    assert len(outbox) == 0


def test_the_test_subscriber_keeps_its_subscription_across_a_broker_restart(broker):
    # The outage tests rest on this: a station that reconnects first must not publish into a void.
    with Subscriber(broker.port, RESULTS) as sub:
        broker.stop()
        broker.start()
        publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="restart-probe", protocol=mqtt.MQTTv5)
        publisher.connect("127.0.0.1", broker.port)
        publisher.loop_start()
        try:
            sent = [f"{i:06d}" for i in range(5)]
            for frame_id in sent:  # most likely before the subscriber is back (it retries every 0.1-0.5 s)
                publisher.publish(result_topic(PREFIX, CAM), result(frame_id).model_dump_json(), qos=1).wait_for_publish(5)
            received = sub.wait_until(result_topic(PREFIX, CAM), lambda ms: len(ms) >= len(sent), timeout_s=15)
        finally:
            publisher.loop_stop()
            publisher.disconnect()
    assert sorted(frame_ids(received)) == sent


def test_test_brokers_get_ports_the_kernel_never_hands_to_outgoing_connections():
    # A broker restarted on its port during an outage test must find it free: a port in the
    # ephemeral range can meanwhile become some client's source port ("Address already in use").
    low, _ = _ephemeral_range()
    assert all(free_port() < low for _ in range(20))

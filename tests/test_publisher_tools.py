"""Camera-side tools against real sockets on 127.0.0.1: FramePublisher → a PULL socket, `edge replay`
of real images and of a video, and `edge watch` against a real mosquitto."""

import argparse
import json
import shutil
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pytest
import zmq

from edge.replay import add_replay_arguments, replay, run_replay
from edge.watch import add_watch_arguments, format_message, format_result_line, run_watch
from protocols.messages import (ErrorReport, FrameHeader, LatencyMs, ModelRef, Region, Result, decode_header,
                                error_topic, result_topic, status_topic)
from protocols.publisher import ZERO_COPY_MIN_BYTES, FramePublisher
from mqtt_broker import Broker

pytestmark = pytest.mark.timeout(60)  # an unbounded send waits for its reader: never hang the suite

RECEIVE_TIMEOUT_S = 10.0


@pytest.fixture
def pull() -> Iterator[tuple[zmq.Socket, str]]:
    """A PULL socket bound on a random loopback port, and the endpoint to connect to."""
    context = zmq.Context()
    socket = context.socket(zmq.PULL)
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    yield socket, f"tcp://127.0.0.1:{port}"
    socket.close(linger=0)
    context.term()


def receive(socket: zmq.Socket, count: int) -> list[tuple[FrameHeader, bytes]]:
    """`count` two-part frames, each header validated; fails if they do not arrive in time."""
    frames = []
    deadline = time.monotonic() + RECEIVE_TIMEOUT_S
    while len(frames) < count:
        remaining_ms = int((deadline - time.monotonic()) * 1000)
        assert remaining_ms > 0 and socket.poll(remaining_ms), f"{len(frames)} of {count} frames arrived"
        parts = socket.recv_multipart()
        assert len(parts) == 2
        frames.append((decode_header(parts[0]), parts[1]))
    assert not socket.poll(100), "more frames than expected"
    return frames


def test_payload_is_what_was_sent_although_the_caller_reuses_its_buffer(pull):
    socket, endpoint = pull
    socket.rcvhwm = 1  # a slow reader: frames back up into the kernel's buffers and the sender's queue
    camera_buffer = np.empty((1024, 1024, 3), np.uint8)
    assert camera_buffer.nbytes >= ZERO_COPY_MIN_BYTES  # the zero-copy path
    count = 8  # 24 MB: more than loopback socket buffers hold, so some sends wait for the reader
    received = []
    reader = threading.Thread(target=lambda: (time.sleep(0.3), received.extend(receive(socket, count))))
    reader.start()
    try:
        with FramePublisher(endpoint, camera_id="cam7") as publisher:
            for i in range(count):
                camera_buffer[:] = i
                publisher.send_image(camera_buffer, f"{i:06d}", ts_ns=1_000 + i, part_id=f"SN-{i}")
                camera_buffer[:] = 255  # the next capture overwrites the buffer as soon as the send returns
    finally:
        reader.join(RECEIVE_TIMEOUT_S + 5)
    assert len(received) == count
    for i, (header, payload) in enumerate(received):
        assert (header.camera_id, header.frame_id, header.ts_ns) == ("cam7", f"{i:06d}", 1_000 + i)
        assert header.part_id == f"SN-{i}"
        assert (header.encoding, header.pixel_format, header.width, header.height) == ("raw", "bgr8", 1024, 1024)
        pixels = np.frombuffer(payload, np.uint8)
        assert pixels.size == camera_buffer.size and pixels.min() == pixels.max() == i, f"frame {i} was overwritten"


def test_mono_and_non_contiguous_images_are_sent_tightly_packed(pull):
    socket, endpoint = pull
    rng = np.random.default_rng(1)
    mono = rng.integers(0, 256, (60, 80), dtype=np.uint8)
    crop = rng.integers(0, 256, (400, 500, 3), dtype=np.uint8)[10:310, 20:420]  # a view with row gaps
    with FramePublisher(endpoint) as publisher:
        publisher.send_image(mono, "mono", pixel_format="mono8", meta={"exposure_us": 800})
        publisher.send_image(crop, "crop", pixel_format="rgb8")
        with pytest.raises(ValueError, match="mono8"):
            publisher.send_image(crop, "wrong", pixel_format="mono8")
        (mono_header, mono_payload), (crop_header, crop_payload) = receive(socket, 2)
    assert (mono_header.pixel_format, mono_header.width, mono_header.height) == ("mono8", 80, 60)
    assert mono_header.meta == {"exposure_us": 800}
    assert len(mono_payload) == mono_header.raw_size and mono_payload == mono.tobytes()
    assert (crop_header.pixel_format, crop_header.width, crop_header.height) == ("rgb8", 400, 300)
    assert crop_payload == np.ascontiguousarray(crop).tobytes()


def test_bounded_send_times_out_when_nobody_reads():
    context = zmq.Context()
    stalled = context.socket(zmq.PULL)
    stalled.rcvhwm = 1
    port = stalled.bind_to_random_port("tcp://127.0.0.1")
    publisher = FramePublisher(f"tcp://127.0.0.1:{port}", sndhwm=1)
    frame = np.zeros((1024, 1024, 3), np.uint8)
    try:
        # Accepted sends fill the queues and the kernel's socket buffers (a few MB) first.
        with pytest.raises(TimeoutError, match="not reading"):
            for i in range(100):
                publisher.send_image(frame, f"{i:06d}", timeout_ms=100)
    finally:
        publisher.close(linger_ms=0)
        stalled.close(linger=0)
        context.term()


@pytest.fixture
def image_folder(datasets_dir, tmp_path) -> Path:
    """Real hazelnut images in nested folders: two JPEGs, a PNG, and a file that is no image."""
    good = sorted((datasets_dir / "hazelnut" / "test" / "good").glob("*.jpg"))
    defective = sorted((datasets_dir / "hazelnut" / "test" / "colour").glob("*.jpg"))
    folder = tmp_path / "images"
    (folder / "a").mkdir(parents=True)
    (folder / "b" / "c").mkdir(parents=True)
    shutil.copy(good[0], folder / "a" / "00.jpg")
    shutil.copy(defective[0], folder / "a" / "01.jpg")
    cv2.imwrite(str(folder / "b" / "c" / "02.png"), cv2.imread(str(good[1])))
    (folder / "b" / "notes.txt").write_text("not an image")
    return folder


def test_replay_sends_a_folders_files_as_they_are_in_path_order(image_folder, pull):
    socket, endpoint = pull
    assert replay(image_folder, endpoint, camera_id="line1") == 3
    received = receive(socket, 3)
    files = [image_folder / "a" / "00.jpg", image_folder / "a" / "01.jpg", image_folder / "b" / "c" / "02.png"]
    for i, ((header, payload), path) in enumerate(zip(received, files)):
        height, width = cv2.imread(str(path)).shape[:2]
        assert (header.camera_id, header.frame_id) == ("line1", f"{i:06d}")
        expected_encoding = "png" if path.suffix == ".png" else "jpeg"
        assert (header.encoding, header.width, header.height) == (expected_encoding, width, height)
        assert payload == path.read_bytes()


def test_replay_raw_sends_decoded_pixels(image_folder, pull):
    socket, endpoint = pull
    assert replay(image_folder, endpoint, encoding="raw", limit=2) == 2
    for (header, payload), name in zip(receive(socket, 2), ("00.jpg", "01.jpg")):
        image = cv2.imread(str(image_folder / "a" / name))
        assert (header.encoding, header.pixel_format) == ("raw", "bgr8")
        assert (header.height, header.width) == image.shape[:2]
        assert payload == image.tobytes()


def test_replay_loops_at_the_requested_rate(image_folder, pull):
    socket, endpoint = pull
    started = time.monotonic()
    assert replay(image_folder, endpoint, fps=10, encoding="png", limit=5, loop=True) == 5
    elapsed = time.monotonic() - started
    assert elapsed >= 0.35  # frame 4 is due 0.4 s after frame 0
    received = receive(socket, 5)
    assert [header.frame_id for header, _ in received] == [f"{i:06d}" for i in range(5)]
    assert {header.encoding for header, _ in received} == {"png"}
    assert received[3][1] == received[0][1]  # the second pass starts over


def test_replay_of_a_video_sends_jpeg_frames(tmp_path, pull):
    socket, endpoint = pull
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write MJPG video")
    for i in range(6):
        writer.write(np.full((48, 64, 3), 40 * i, np.uint8))
    writer.release()
    capture = cv2.VideoCapture(str(video))
    readable = capture.isOpened() and capture.read()[0]
    capture.release()
    if not readable:
        pytest.skip("this OpenCV build cannot read back MJPG video")
    assert replay(video, endpoint) == 6
    received = receive(socket, 6)
    for i, (header, payload) in enumerate(received):
        assert (header.frame_id, header.encoding, header.width, header.height) == (f"{i:06d}", "jpeg", 64, 48)
        decoded = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
        assert abs(float(decoded.mean()) - 40 * i) < 8


def test_run_replay_prints_a_summary_and_reports_errors(image_folder, pull, capsys):
    socket, endpoint = pull
    parser = argparse.ArgumentParser()
    add_replay_arguments(parser)
    assert run_replay(parser.parse_args([str(image_folder), "--connect", endpoint, "--limit", "2"])) == 0
    assert "sent 2 frames" in capsys.readouterr().out
    receive(socket, 2)
    assert run_replay(parser.parse_args([str(image_folder / "missing"), "--connect", endpoint])) == 1
    assert "error: no such folder or video" in capsys.readouterr().err


def make_result(frame_id: str, verdict: str = "fail", ts_result_ns: int = 1_732_400_000_123_000_000) -> Result:
    return Result(result_id=f"r{frame_id}", camera_id="cam0", frame_id=frame_id, part_id="SN-42", verdict=verdict,
                  score=0.73, threshold=0.41,
                  ts_capture_ns=ts_result_ns - 90_000_000, ts_result_ns=ts_result_ns,
                  latency_ms=LatencyMs(queue=2.0, decode=3.1, infer=70.0, post=10.1, total=85.24),
                  model=ModelRef(name="hazelnut-small", version="2024.11.3", sha256="ab" * 32),
                  regions=[Region(bbox=(1, 2, 3, 4), area_px=12, max_score=0.9),
                           Region(bbox=(10, 20, 5, 5), area_px=25, max_score=0.8)],
                  mask=None)


def test_format_result_line():
    result = make_result("000123")
    line = format_result_line(result)
    clock = datetime.fromtimestamp(result.ts_result_ns / 1e9).strftime("%H:%M:%S.%f")[:-3]
    assert line.startswith(clock)
    for part in ("cam0", "000123", "SN-42", "FAIL", "0.730 / 0.410", "regions 2", "total 85.2 ms", "2024.11.3"):
        assert part in line
    assert "\033[" not in line
    assert "\033[31mFAIL\033[0m" in format_result_line(result, color=True)
    assert "\033[32mPASS\033[0m" in format_result_line(make_result("000124", "pass"), color=True)


def test_format_message_routes_by_topic_and_survives_bad_payloads():
    prefix = "inspection/line1"
    line, is_result = format_message(prefix, result_topic(prefix, "cam0"), make_result("000001").encode())
    assert is_result and "000001" in line
    report = ErrorReport(error_id="e1", kind="rejected", reason="header frame_id: missing", camera_id="cam0", ts_ns=0)
    line, is_result = format_message(prefix, error_topic(prefix), report.encode())
    assert not is_result and "ERROR" in line and "header frame_id: missing" in line
    for payload in (b"not json", b"\xff\xfe", json.dumps({"v": 1, "state": "online"}).encode()):
        line, is_result = format_message(prefix, status_topic(prefix), payload)
        assert not is_result and "UNDECODABLE Status" in line


def watch_args(port: int, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_watch_arguments(parser)
    return parser.parse_args(["--host", "127.0.0.1", "--port", str(port), "--station", "line1", *extra])


def test_run_watch_prints_results_from_a_real_broker(tmp_path, capsys):
    prefix = "inspection/line1"
    stop = threading.Event()
    with Broker(tmp_path) as broker:
        publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        publisher.connect("127.0.0.1", broker.port)
        publisher.loop_start()
        # Retained, so the watcher gets it on subscribing: it must print it as undecodable and go on.
        publisher.publish(status_topic(prefix), b"{garbage", qos=1, retain=True).wait_for_publish(5)

        def publish_results() -> None:
            # Results are not retained: keep publishing until the watcher (subscribing meanwhile) has its two.
            for i in range(100):
                if stop.wait(0.1):
                    return
                result = make_result(f"{i:06d}", ts_result_ns=time.time_ns())
                publisher.publish(result_topic(prefix, "cam0"), result.encode(), qos=1)

        thread = threading.Thread(target=publish_results)
        thread.start()
        try:
            exit_code = run_watch(watch_args(broker.port, "--count", "2", "--timeout", "20"))
        finally:
            stop.set()
            thread.join(5)
            publisher.disconnect()
            publisher.loop_stop()
    assert exit_code == 0
    lines = capsys.readouterr().out.splitlines()
    assert any("UNDECODABLE Status" in line for line in lines)
    assert sum("FAIL" in line and "SN-42" in line for line in lines) == 2


def test_run_watch_exits_1_on_timeout_or_without_a_broker(tmp_path, capsys):
    with Broker(tmp_path) as broker:
        started = time.monotonic()
        assert run_watch(watch_args(broker.port, "--count", "1", "--timeout", "0.5")) == 1
        assert time.monotonic() - started < 10
        port = broker.port
    assert run_watch(watch_args(port, "--count", "1", "--timeout", "5")) == 1
    assert "cannot reach the broker" in capsys.readouterr().err

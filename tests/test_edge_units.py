"""The daemon's pure parts: frame decoding, post-processing, queueing, settings, sd_notify."""

import base64
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import get_args

import cv2
import numpy as np
import pytest

from edge.frame_queue import FrameQueue
from edge.answer_ids import AnswerIds
from hostile_frames import jpeg_declaring, png_declaring
from edge.frames import FrameIdGaps, decode_message, to_model_input
from edge.postprocess import fail_region_threshold, find_regions, mask_png_base64, upscale_map
from edge.settings import BackendChoice, InferenceSettings, SettingsError, ZmqSettings, load_settings, reference_rows
from edge.systemd import SystemdNotifier
from protocols.messages import FrameError, FrameHeader

README = Path(__file__).resolve().parents[1] / "README.md"


def header(**fields) -> bytes:
    base = {"camera_id": "cam0", "frame_id": "1", "ts_ns": 1, "encoding": "raw", "width": 4, "height": 3,
            "pixel_format": "bgr8"}
    return FrameHeader(**{**base, **fields}).encode()


LIMITS = ZmqSettings(max_header_bytes=1024, max_meta_bytes=64, max_pixels=10_000)


def test_raw_bgr_mono_and_encoded_frames_decode_to_rgb():
    bgr = np.random.default_rng(0).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    _, rgb = decode_message([header(), bgr.tobytes()], LIMITS)
    assert np.array_equal(rgb, bgr[..., ::-1])
    _, rgb = decode_message([header(pixel_format="rgb8"), bgr.tobytes()], LIMITS)
    assert np.array_equal(rgb, bgr)
    _, rgb = decode_message([header(pixel_format="mono8"), bgr[..., 0].tobytes()], LIMITS)
    assert rgb.shape == (3, 4, 3) and np.array_equal(rgb[..., 1], bgr[..., 0])
    png = cv2.imencode(".png", bgr)[1].tobytes()
    _, rgb = decode_message([header(encoding="png", pixel_format=None), png], LIMITS)
    assert np.array_equal(rgb, bgr[..., ::-1])
    jpeg = cv2.imencode(".jpg", bgr)[1].tobytes()
    _, rgb = decode_message([header(encoding="jpeg", pixel_format=None), jpeg], LIMITS)
    assert rgb.shape == (3, 4, 3)


@pytest.mark.parametrize("parts, reason", [
    ([b"{nope", b"x"], "not valid JSON"),
    ([b'{"v": 1, "camera_id": "cam0"}', b"x"], "header frame_id"),
    ([header(), b"\0" * 35], "needs 36"),
    ([header(encoding="jpeg", pixel_format=None), b"\xff\xd8garbage"], "not a decodable JPEG"),
    ([header(), b"\0" * 36, b"extra"], "3 parts"),
    ([header(width=1000, height=1000), b"\0" * 36], "1000x1000 = 1000000 pixels, over the limit of 10000"),
    ([header(meta={"note": "x" * 100}), b"\0" * 36], "meta of 111 bytes exceeds the limit of 64"),
    ([header(meta={"pad": "x" * 2000}), b"\0" * 36], "header of 2\\d+ bytes exceeds the limit of 1024"),
    ([header(encoding="png", pixel_format=None), png_declaring(30000, 30000)], "declares 30000x30000"),
    ([header(encoding="jpeg", pixel_format=None), jpeg_declaring(30000, 30000)], "declares 30000x30000"),
    ([header(encoding="png", pixel_format=None, width=8, height=8), jpeg_declaring(8, 8)], "not a decodable PNG"),
    ([header(encoding="jpeg", pixel_format=None), b""], "not a decodable JPEG"),
    ([header(encoding="png", pixel_format=None), b""], "not a decodable PNG"),
    ([header(encoding="jpeg", pixel_format=None), jpeg_declaring(4, 3)[:40]], "not a decodable JPEG"),
    ([header(encoding="jpeg", pixel_format=None), jpeg_declaring(60, 50)], "JPEG file is 60x50, header says 4x3"),
    ([header().replace(b'"cam0"', b'"a/b"'), b"\0" * 36], "camera_id"),
    ([header(encoding="png", pixel_format=None, width=5), cv2.imencode(".png", np.zeros((3, 4), np.uint8))[1].tobytes()],
     "PNG file is 4x3, header says 5x3"),
])
def test_malformed_frames_are_rejected_with_a_reason(parts, reason):
    with pytest.raises(FrameError, match=reason):
        decode_message(parts, LIMITS)


def test_frame_id_gaps_count_missing_numbers_per_camera_and_ignore_restarts():
    gaps = FrameIdGaps()
    assert [gaps.missed("a", f) for f in ("000001", "000002", "000005", "000001", "000003", "x7", "000004")] == \
        [0, 0, 2, 0, 1, 0, 0]
    assert gaps.missed("b", "000009") == 0
    for camera in range(FrameIdGaps.MAX_CAMERAS):  # invented camera ids push out the least recent
        gaps.missed(f"x{camera}", "1")
    assert gaps.missed("a", "000009") == 0 and len(gaps._last) == FrameIdGaps.MAX_CAMERAS


def test_answer_ids_are_unique_and_sort_by_time_across_threads():
    ids = AnswerIds()
    made: list[str] = []
    threads = [threading.Thread(target=lambda: made.extend(ids.next() for _ in range(2000))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(made)) == 8000
    first = ids.next()
    assert first > max(made) and AnswerIds().next() > first


def test_backend_setting_is_a_checked_choice_of_the_loaders_backends(tmp_path):
    from edge.runtime.loader import BACKEND_KEYS

    assert set(get_args(BackendChoice)) == set(BACKEND_KEYS)
    with pytest.raises(SettingsError, match="inference.backend"):
        load_settings(None, bundle="/b", inference={"backend": "gpu-please"})


def test_head_setting_is_a_checked_choice_of_the_loaders_heads():
    from edge.runtime.loader import HEAD_CHOICES

    assert set(get_args(InferenceSettings.model_fields["head"].annotation)) == set(HEAD_CHOICES)
    with pytest.raises(SettingsError, match="inference.head"):
        load_settings(None, bundle="/b", inference={"head": "both"})


def test_model_input_resize_and_map_upscale_keep_shapes():
    rgb = np.zeros((90, 120, 3), np.uint8)
    assert to_model_input(rgb, 64, 64).shape == (64, 64, 3)
    assert upscale_map(np.zeros((64, 64), np.float32), 90, 120).shape == (90, 120)


def test_regions_are_connected_components_with_bbox_area_and_max_score():
    frame_map = np.zeros((20, 30), np.float32)
    frame_map[2:5, 3:9] = 0.7
    frame_map[3, 4] = 0.95
    frame_map[10:18, 20:22] = 0.6
    frame_map[0, 29] = 0.9  # a single pixel, dropped by min_area
    mask, regions = find_regions(frame_map, 0.5, min_area_px=2)
    assert [(r.bbox, r.area_px, r.max_score) for r in regions] == [
        ((3, 2, 6, 3), 18, pytest.approx(0.95)), ((20, 10, 2, 8), 16, pytest.approx(0.6))]
    assert mask.sum() == 18 + 16 + 1
    png = cv2.imdecode(np.frombuffer(base64.b64decode(mask_png_base64(mask)), np.uint8), cv2.IMREAD_UNCHANGED)
    assert png.shape == (20, 30) and set(np.unique(png)) == {0, 255}


def test_a_fail_shows_where_on_the_maps_own_scale_whichever_head_decided():
    frame_map = np.full((40, 40), 0.2, np.float32)
    frame_map[10:14, 20:23] = 0.6  # the defect: below the pixel threshold, above the rest
    # RADAR: the image threshold (0.05) is a one-class score, not a map value: the peak shows, not the frame.
    _, regions = find_regions(frame_map, fail_region_threshold(0.9, 0.05, frame_map, score_from_map=False), 1)
    assert [(r.bbox, r.area_px) for r in regions] == [((20, 10, 3, 4), 12)]
    # Norm-guided: its score is a mean of the map's highest pixels, so the image threshold is a map value.
    assert fail_region_threshold(0.9, 0.5, frame_map, score_from_map=True) == 0.5
    assert fail_region_threshold(0.3, 0.5, frame_map, score_from_map=False) == 0.3


def test_latest_policy_drops_the_oldest_and_block_policy_waits():
    latest: FrameQueue[int] = FrameQueue(2, "latest")
    assert [latest.put(i) for i in range(4)] == [None, None, 0, 1]
    assert latest.get_batch(8, 0.0, 0.1) == [2, 3]

    blocking: FrameQueue[int] = FrameQueue(1, "block")
    blocking.put(0)
    entered = threading.Event()

    def producer():
        entered.set()
        blocking.put(1)

    thread = threading.Thread(target=producer)
    thread.start()
    entered.wait(5)
    time.sleep(0.05)
    assert thread.is_alive() and len(blocking) == 1, "put must wait while the queue is full"
    assert blocking.get_batch(1, 0.0, 1.0) == [0]
    thread.join(5)
    assert blocking.get_batch(4, 0.0, 1.0) == [1]
    assert blocking.get_batch(4, 0.0, 0.05) == []


def test_micro_batch_waits_up_to_max_wait_for_more_frames():
    q: FrameQueue[int] = FrameQueue(16, "block")
    q.put(0)
    threading.Timer(0.05, lambda: [q.put(i) for i in (1, 2)]).start()
    assert q.get_batch(3, max_wait_s=2.0, idle_timeout_s=1.0) == [0, 1, 2]


def test_settings_from_toml_and_environment(tmp_path, monkeypatch):
    config = tmp_path / "edge.toml"
    config.write_text('bundle = "/b"\nstation_id = "s1"\n[mqtt]\nport = 1999\n')
    monkeypatch.setenv("EDGE_MQTT__PORT", "1884")
    settings = load_settings(config)
    assert (settings.mqtt.port, settings.topic_prefix, str(settings.bundle)) == (1884, "inspection/s1", "/b")
    config.write_text('bundle = "/b"\n[mqtt]\nprot = 1\n')
    with pytest.raises(SettingsError, match="mqtt.prot: unknown setting"):
        load_settings(config)
    monkeypatch.setenv("EDGE_MQTT__PORT", "not-a-port")
    with pytest.raises(SettingsError, match="mqtt.port"):
        load_settings(None, bundle="/b")


def test_example_config_loads_and_readme_documents_every_setting():
    example = Path(__file__).resolve().parents[1] / "configs" / "edge.toml"
    assert load_settings(example).station_id == "line1-station3"
    readme = README.read_text()
    for key, env, default, _ in reference_rows():
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, f"README configuration table lacks {key}"
        assert f"`{env}`" in row and default in row, f"README row for {key} is stale: {row}"


def test_sd_notify_sends_datagrams_to_the_notify_socket(tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", "4000000")
        notifier = SystemdNotifier()
        assert notifier.watchdog_interval_s == 2.0
        notifier.ready("ok")
        notifier.watchdog()
        assert server.recv(256) == b"READY=1\nSTATUS=ok"
        assert server.recv(256) == b"WATCHDOG=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    SystemdNotifier().ready("no socket: a no-op")
    assert os.environ.get("NOTIFY_SOCKET") is None


@pytest.mark.parametrize("content, expected", [
    ('bundle = "/b"\nstation_id = "bad/id"\n', "station_id"),
    ('bundle = "/nonexistent-bundle"\n', "/nonexistent-bundle: not a directory"),
    ('bundle = "/b"\n[inference]\nbackpressure = "drop-everything"\n', "inference.backpressure"),
    ('bundle = "/b"\n[mqtt]\npassword = "x"\n', "mqtt.password needs mqtt.username"),
    ('bundle = "/b"\n[mqtt.tls]\nkeyfile = "/k"\n', "mqtt.tls.keyfile needs mqtt.tls.certfile"),
])
def test_edge_serve_refuses_bad_settings_in_one_line(tmp_path, content, expected):
    config = tmp_path / "edge.toml"
    config.write_text(content)
    result = subprocess.run([sys.executable, "-m", "edge", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr, result.stderr


def test_cpu_features_are_the_flags_line_of_cpuinfo():
    from edge.runtime.cpu_features import parse_cpu_flags

    cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 fma\nbugs\t\t: sysret_ss_attrs\n"
    assert parse_cpu_flags(cpuinfo) == {"fpu", "sse2", "avx2", "fma"}
    assert parse_cpu_flags("processor\t: 0\n") == frozenset()

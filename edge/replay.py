"""`edge replay`: send a folder of images or a video to the daemon as camera frames, for trying
out and measuring a station without a camera."""

import argparse
import functools
import itertools
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import zmq

from protocols.messages import CAMERA_ID_PATTERN
from protocols.publisher import CurveClientKeys, FramePublisher, PixelFormat

ReplayEncoding = Literal["file", "jpeg", "png", "raw"]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
# Files the wire carries as they are; other image formats are re-encoded (as PNG, lossless).
FILE_ENCODINGS = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png"}
# A daemon that accepts no frame for this long is taken to be absent or stuck.
STALL_TIMEOUT_MS = 30_000


@dataclass(frozen=True)
class WireFrame:
    """One frame as it goes on the wire: raw pixels or an encoded file."""
    payload: np.ndarray | bytes
    encoding: Literal["raw", "jpeg", "png"]
    width: int
    height: int
    pixel_format: PixelFormat | None = None


def replay(source: Path, connect: str, fps: float | None = None, camera_id: str = "cam0",
           encoding: ReplayEncoding | None = None, limit: int | None = None, loop: bool = False,
           curve: CurveClientKeys | None = None) -> int:
    """Send every image of a folder (recursive, in path order) or every frame of a video to the
    frame endpoint `connect`; return how many frames were sent. Frame ids are 000000, 000001, ...

    encoding: `file` (the default for folders) sends JPEG/PNG files' bytes as they are; `jpeg`
    (the default for videos), `png` and `raw` (bgr8, or mono8 for grayscale images) decode and
    re-encode. fps: frame n goes at start + n / fps (a fixed schedule: no drift), else as fast as
    the daemon takes them. loop: start over at the end (stop with `limit` or Ctrl-C). curve: keys
    for a station that only takes CURVE cameras (`zmq.curve`).
    Raises TimeoutError if the daemon accepts no frame for STALL_TIMEOUT_MS.
    """
    frames = _passes(_open_source(source, encoding), loop)
    if limit is not None:
        frames = itertools.islice(frames, limit)
    publisher = FramePublisher(connect, camera_id, curve=curve)
    try:
        sent = _send_all(publisher, frames, fps)
    except BaseException:
        publisher.close(linger_ms=0)  # stopped or stuck: drop what is still queued
        raise
    publisher.close(linger_ms=STALL_TIMEOUT_MS)  # finished: let the queued frames reach the daemon
    return sent


def _send_all(publisher: FramePublisher, frames: Iterator[WireFrame], fps: float | None) -> int:
    start = time.monotonic()
    sent = 0
    for frame in frames:
        if fps is not None:
            _sleep_until(start + sent / fps)
        frame_id = f"{sent:06d}"
        if frame.encoding == "raw":
            publisher.send_image(frame.payload, frame_id, pixel_format=frame.pixel_format, timeout_ms=STALL_TIMEOUT_MS)
        else:
            publisher.send_encoded(frame.payload, frame.encoding, frame.width, frame.height, frame_id,
                                   timeout_ms=STALL_TIMEOUT_MS)
        sent += 1
    return sent


def _sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _open_source(source: Path, encoding: ReplayEncoding | None) -> Callable[[], Iterator[WireFrame]]:
    """A function reading the source once, start to end. Problems with the source itself show now,
    before anything connects."""
    if source.is_dir():
        return functools.partial(_folder_frames, source, encoding or "file")
    if not source.is_file():
        raise FileNotFoundError(f"no such folder or video: {source}")
    if encoding == "file":
        raise ValueError("a video has no image files to send: use --encoding jpeg, png or raw")
    return functools.partial(_video_frames, source, encoding or "jpeg")


def _passes(read_pass: Callable[[], Iterator[WireFrame]], loop: bool) -> Iterator[WireFrame]:
    while True:
        count = 0
        for frame in read_pass():
            count += 1
            yield frame
        if count == 0:
            raise ValueError("the source holds no frames")
        if not loop:
            return


def _folder_frames(folder: Path, encoding: ReplayEncoding) -> Iterator[WireFrame]:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    for path in paths:
        data = path.read_bytes()
        # Decoded even when sent as it is: the header carries the decoded size.
        # IMREAD_ANYCOLOR: 8-bit, grayscale stays one channel; EXIF orientation applied, as the daemon does.
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_ANYCOLOR)
        if image is None:
            raise ValueError(f"not a readable image: {path}")
        file_encoding = FILE_ENCODINGS.get(path.suffix.lower())
        if encoding == "file" and file_encoding is not None:
            yield WireFrame(data, file_encoding, width=image.shape[1], height=image.shape[0])
        else:
            yield _encode(image, "png" if encoding == "file" else encoding)


def _video_frames(video: Path, encoding: ReplayEncoding) -> Iterator[WireFrame]:
    capture = cv2.VideoCapture(str(video))
    if not capture.isOpened():
        raise ValueError(f"not a folder or a readable video: {video}")
    try:
        while True:
            ok, image = capture.read()
            if not ok:
                return
            yield _encode(image, encoding)
    finally:
        capture.release()


def _encode(image: np.ndarray, encoding: Literal["jpeg", "png", "raw"]) -> WireFrame:
    """A decoded image (BGR, or grayscale [H, W]) as a wire frame."""
    height, width = image.shape[:2]
    if encoding == "raw":
        return WireFrame(image, "raw", width, height, pixel_format="mono8" if image.ndim == 2 else "bgr8")
    ok, data = cv2.imencode(".jpg" if encoding == "jpeg" else ".png", image)
    if not ok:
        raise ValueError(f"could not encode a {width}x{height} frame as {encoding}")
    return WireFrame(data.tobytes(), encoding, width, height)


def add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path,
                        help="a folder of images (searched recursively, sent in path order) or a video file")
    parser.add_argument("--connect", default="tcp://127.0.0.1:5555", metavar="tcp://HOST:PORT",
                        help="the daemon's frame endpoint (default: %(default)s)")
    parser.add_argument("--fps", type=positive_float,
                        help="frames per second (default: as fast as the daemon takes them)")
    parser.add_argument("--camera-id", type=_camera_id, default="cam0",
                        help="camera id in the frame headers (default: %(default)s)")
    parser.add_argument("--limit", type=positive_int, metavar="N", help="stop after N frames")
    parser.add_argument("--encoding", choices=("file", "jpeg", "png", "raw"),
                        help="file: image files as they are (folder default); "
                             "jpeg (video default), png, raw: decode and re-encode")
    parser.add_argument("--loop", action="store_true", help="start over at the end (until --limit or Ctrl-C)")
    parser.add_argument("--server-key", type=Path, metavar="FILE",
                        help="the station's public certificate (its NAME.key from `edge keys`), for a station with "
                             "zmq.curve; with --camera-key")
    parser.add_argument("--camera-key", type=Path, metavar="FILE",
                        help="this camera's secret certificate (NAME.key_secret; the station authorises NAME.key)")


def run_replay(args: argparse.Namespace) -> int:
    """`edge replay`: exit code 0 when every frame was sent, 1 on an error, 2 on a usage error, 130 on Ctrl-C."""
    if (args.server_key is None) != (args.camera_key is None):
        print("edge replay: error: --server-key and --camera-key go together (CURVE needs the station's public "
              "certificate and this camera's secret one)", file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        curve = CurveClientKeys.from_files(args.server_key, args.camera_key) if args.server_key else None
        sent = replay(args.source, args.connect, args.fps, args.camera_id, args.encoding, args.limit, args.loop,
                      curve)
    except (OSError, ValueError, zmq.ZMQError) as err:  # TimeoutError is an OSError
        print(f"edge replay: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edge replay: interrupted", file=sys.stderr)
        return 130
    elapsed = time.monotonic() - started
    print(f"edge replay: sent {sent} frames from {args.source} to {args.connect} "
          f"in {elapsed:.1f} s ({sent / elapsed:.1f} frames/s)")
    return 0


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


def positive_float(text: str) -> float:
    problem = argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    try:
        value = float(text)
    except ValueError:
        raise problem from None
    if not value > 0:  # also refuses nan
        raise problem
    return value


def _camera_id(text: str) -> str:
    if not re.fullmatch(CAMERA_ID_PATTERN, text):
        raise argparse.ArgumentTypeError(f"{text!r}: 1-64 of letters, digits and _.:- (it is one MQTT topic level)")
    return text

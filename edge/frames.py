"""Frames off the wire: validate a two-part message against the station's limits and decode it to
RGB, then to the model's input size. Every size is checked before the memory for it is allocated;
every rejection is a FrameError with a reason."""

import io
import json
import re
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from edge.settings import ZmqSettings
from protocols.messages import FrameError, FrameHeader, decode_header

# Pillow only reads file headers here; the station's own max_pixels check replaces Pillow's
# decompression-bomb limits (a warning, then an error, at sizes of its own choosing).
Image.MAX_IMAGE_PIXELS = None
PILLOW_FORMATS = {"jpeg": "JPEG", "png": "PNG"}


@dataclass
class Frame:
    """An accepted frame as it waits for inference: the model-size input and what post-processing
    needs (the header: frame size, ids, meta), never the full-resolution pixels."""
    header: FrameHeader
    received_ns: int          # time.monotonic_ns() when the message arrived
    decode_ms: float
    model_input: np.ndarray   # uint8 [H, W, 3] RGB at the model's size
    journal_id: int | None    # its row in the outbox's journal of accepted frames


def decode_message(parts: list[bytes | memoryview], limits: ZmqSettings) -> tuple[FrameHeader, np.ndarray]:
    """[header, payload] → (header, RGB image at the header's size)."""
    if len(parts) != 2:
        raise FrameError(f"expected a 2-part message [header, payload], got {len(parts)} parts")
    if len(parts[0]) > limits.max_header_bytes:
        raise FrameError(f"header of {len(parts[0])} bytes exceeds the limit of {limits.max_header_bytes}")
    header = decode_header(bytes(parts[0]))
    if header.meta is not None and (size := len(json.dumps(header.meta, separators=(",", ":")))) > limits.max_meta_bytes:
        raise FrameError(f"meta of {size} bytes exceeds the limit of {limits.max_meta_bytes}")
    _check_pixels(header.width, header.height, limits.max_pixels, "header declares")
    payload = parts[1]
    if header.encoding == "raw":
        return header, _raw_to_rgb(header, payload)
    return header, _encoded_to_rgb(header, payload, limits.max_pixels)


def _check_pixels(width: int, height: int, max_pixels: int, what: str) -> None:
    if width * height > max_pixels:
        raise FrameError(f"{what} {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")


def _raw_to_rgb(header: FrameHeader, payload: bytes | memoryview) -> np.ndarray:
    if len(payload) != header.raw_size:
        raise FrameError(f"raw {header.pixel_format} payload is {len(payload)} bytes, "
                         f"{header.width}x{header.height} needs {header.raw_size}")
    pixels = np.frombuffer(payload, dtype=np.uint8)
    if header.pixel_format == "mono8":
        return cv2.cvtColor(pixels.reshape(header.height, header.width), cv2.COLOR_GRAY2RGB)
    image = pixels.reshape(header.height, header.width, 3)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if header.pixel_format == "bgr8" else image


def _probe_size(header: FrameHeader, payload: bytes | memoryview) -> tuple[int, int]:
    """(width, height) from the file's own header, read without decoding the pixels (Pillow opens
    lazily), so a small file declaring a huge image is refused before anything is allocated."""
    try:
        with Image.open(io.BytesIO(payload), formats=[PILLOW_FORMATS[header.encoding]]) as probe:
            return probe.size
    except Exception as err:  # Pillow raises many types for malformed files; all mean the same here
        raise FrameError(f"payload is not a decodable {header.encoding.upper()} image "
                         f"({type(err).__name__}: {_first_line(err)})") from None


def _encoded_to_rgb(header: FrameHeader, payload: bytes | memoryview, max_pixels: int) -> np.ndarray:
    width, height = _probe_size(header, payload)
    _check_pixels(width, height, max_pixels, f"{header.encoding.upper()} file declares")
    # OpenCV applies the EXIF orientation when decoding: a rotated file's stored size is swapped.
    if (width, height) not in ((header.width, header.height), (header.height, header.width)):
        raise FrameError(f"{header.encoding.upper()} file is {width}x{height}, header says "
                         f"{header.width}x{header.height}")
    try:
        decoded = cv2.imdecode(np.frombuffer(payload, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as err:
        raise FrameError(f"payload is not a decodable {header.encoding.upper()} image ({_first_line(err)})") from None
    if decoded is None:
        raise FrameError(f"payload is not a decodable {header.encoding.upper()} image")
    height, width = decoded.shape[:2]
    if (width, height) != (header.width, header.height):
        raise FrameError(f"decoded image is {width}x{height}, header says {header.width}x{header.height}")
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]


def to_model_input(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize to the model's input (area averaging when shrinking, as in training)."""
    if rgb.shape[:2] == (height, width):
        return np.ascontiguousarray(rgb)
    shrinking = rgb.shape[0] * rgb.shape[1] > height * width
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


class FrameIdGaps:
    """Frames lost before they reached us, where a camera numbers its frames (sub mode: ZeroMQ drops
    silently at the high-water mark). Counts jumps in integer frame ids per camera; a restart of the
    counter (a smaller id) is not a gap. Remembers at most MAX_CAMERAS cameras (the least recently
    seen is forgotten), so a sender inventing camera ids cannot grow it without bound."""

    MAX_CAMERAS = 1024

    def __init__(self) -> None:
        self._last: dict[str, int] = {}  # insertion order = least recently seen first

    def missed(self, camera_id: str, frame_id: str) -> int:
        if not re.fullmatch(r"\d{1,18}", frame_id):
            return 0
        number, last = int(frame_id), self._last.pop(camera_id, None)
        if len(self._last) >= self.MAX_CAMERAS:
            del self._last[next(iter(self._last))]
        self._last[camera_id] = number
        return number - last - 1 if last is not None and number > last + 1 else 0

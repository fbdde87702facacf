"""Frames off the wire: validate a two-part message and decode it to RGB at frame resolution,
then to the model's input size. Pure functions: every rejection is a FrameError with a reason."""

from dataclasses import dataclass

import cv2
import numpy as np

from protocols.messages import FrameError, FrameHeader, decode_header


@dataclass
class Frame:
    header: FrameHeader
    rgb: np.ndarray          # uint8 [height, width, 3] at frame resolution
    received_ns: int         # time.monotonic_ns() when the message arrived
    decode_ms: float
    model_input: np.ndarray | None = None  # uint8 [H, W, 3] at the model's size


def decode_message(parts: list[bytes | memoryview], max_payload_bytes: int) -> tuple[FrameHeader, np.ndarray]:
    """[header, payload] → (header, RGB image at the header's size)."""
    if len(parts) != 2:
        raise FrameError(f"expected a 2-part message [header, payload], got {len(parts)} parts")
    header = decode_header(bytes(parts[0]))
    payload = parts[1]
    size = len(payload)
    if size > max_payload_bytes:
        raise FrameError(f"payload of {size} bytes exceeds the limit of {max_payload_bytes}")
    if header.encoding == "raw":
        rgb = _raw_to_rgb(header, payload)
    else:
        rgb = _encoded_to_rgb(header, payload)
    return header, rgb


def _raw_to_rgb(header: FrameHeader, payload: bytes | memoryview) -> np.ndarray:
    if len(payload) != header.raw_size:
        raise FrameError(f"raw {header.pixel_format} payload is {len(payload)} bytes, "
                         f"{header.width}x{header.height} needs {header.raw_size}")
    pixels = np.frombuffer(payload, dtype=np.uint8)
    if header.pixel_format == "mono8":
        return cv2.cvtColor(pixels.reshape(header.height, header.width), cv2.COLOR_GRAY2RGB)
    image = pixels.reshape(header.height, header.width, 3)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if header.pixel_format == "bgr8" else image


def _encoded_to_rgb(header: FrameHeader, payload: bytes | memoryview) -> np.ndarray:
    decoded = cv2.imdecode(np.frombuffer(payload, dtype=np.uint8), cv2.IMREAD_COLOR)
    if decoded is None:
        raise FrameError(f"payload is not a decodable {header.encoding.upper()} image")
    height, width = decoded.shape[:2]
    if (width, height) != (header.width, header.height):
        raise FrameError(f"decoded image is {width}x{height}, header says {header.width}x{header.height}")
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


def to_model_input(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize to the model's input (area averaging when shrinking, as in training)."""
    if rgb.shape[:2] == (height, width):
        return np.ascontiguousarray(rgb)
    shrinking = rgb.shape[0] * rgb.shape[1] > height * width
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)

"""Camera side of the frame contract: push two-part [header, payload] messages to the daemon.

The daemon binds PULL; cameras connect PUSH. The daemon applies backpressure by not reading, so a
send blocks once ZeroMQ's queue (SNDHWM) and the kernel buffers are full; a send with
`timeout_ms` raises TimeoutError instead of blocking for longer than that.

A station with `zmq.curve` set only takes cameras that connect with CURVE: pass `CurveClientKeys`
(the station's public certificate and this camera's secret one, both from `edge keys`).
"""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import zmq
import zmq.auth

from protocols.messages import FrameHeader

PixelFormat = Literal["bgr8", "rgb8", "mono8"]
EncodedFormat = Literal["jpeg", "png"]

# Below this many bytes a copy costs less than tracking the message (pyzmq's own default threshold).
ZERO_COPY_MIN_BYTES = 64 * 1024


@dataclass(frozen=True)
class CurveClientKeys:
    """A camera's CURVE keys, Z85-encoded as in ZeroMQ certificates: the station's public key (which
    station the camera talks to) and the camera's own pair (whose public key the station authorises)."""
    server_public: bytes
    camera_public: bytes
    camera_secret: bytes

    @classmethod
    def from_files(cls, server_cert: Path, camera_secret_cert: Path) -> "CurveClientKeys":
        """From the station's public certificate (NAME.key) and the camera's secret one (NAME.key_secret).
        Raises OSError for a missing file, ValueError for a file that is not the right certificate."""
        server_public, _ = zmq.auth.load_certificate(server_cert)
        camera_public, camera_secret = zmq.auth.load_certificate(camera_secret_cert)
        if camera_secret is None:
            raise ValueError(f"{camera_secret_cert} holds no secret key: pass the camera's .key_secret file")
        return cls(server_public, camera_public, camera_secret)


class FramePublisher:
    """A PUSH socket connected to the daemon's frame endpoint; one per camera process or thread
    (ZeroMQ sockets are not thread-safe). With `curve`, the link is encrypted and the station checks
    the camera's key during the handshake; a station that refuses it never reads, so sends time out."""

    def __init__(self, endpoint: str = "tcp://127.0.0.1:5555", camera_id: str = "cam0", sndhwm: int = 16,
                 context: zmq.Context | None = None, curve: CurveClientKeys | None = None) -> None:
        self.endpoint = endpoint
        self.camera_id = camera_id
        # An own context by default, so that close() can wait for queued frames to go out.
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._socket = self._context.socket(zmq.PUSH)
        self._socket.sndhwm = sndhwm
        if curve is not None:  # before connecting: the handshake uses them
            self._socket.curve_serverkey = curve.server_public
            self._socket.curve_publickey = curve.camera_public
            self._socket.curve_secretkey = curve.camera_secret
        self._socket.connect(endpoint)

    def send_image(self, image: np.ndarray, frame_id: str, ts_ns: int | None = None,
                   pixel_format: PixelFormat = "bgr8", part_id: str | None = None, meta: dict | None = None,
                   timeout_ms: int | None = None) -> None:
        """Send a raw uint8 frame: [H, W] or [H, W, 1] for mono8, [H, W, 3] for bgr8/rgb8.

        When this returns, the caller may overwrite or reuse `image` (e.g. hand the buffer back to
        a camera's buffer pool). How that is made safe depends on the send:
          - unbounded (`timeout_ms=None`) and at least ZERO_COPY_MIN_BYTES: zero-copy. ZeroMQ reads
            the pixels straight from the (C-contiguous) array, and this call waits until its
            MessageTracker reports that ZeroMQ has released the buffer, which for TCP means every
            byte has been written to the kernel. So while the daemon is not reading, an unbounded
            large frame waits for the kernel's socket buffer to drain, not for room in SNDHWM.
          - bounded (`timeout_ms` given) or small: ZeroMQ copies the pixels during the send. A bounded
            send cannot be zero-copy: once queued, a frame cannot be taken back, so on a timeout
            ZeroMQ would still hold the caller's buffer after the call had returned.
        Raises TimeoutError if the frame could not be queued within `timeout_ms` (nothing was sent).
        """
        height, width = _frame_size(image, pixel_format)
        pixels = np.ascontiguousarray(image)
        header = FrameHeader(camera_id=self.camera_id, frame_id=frame_id, ts_ns=_now_or(ts_ns), encoding="raw",
                             width=width, height=height, pixel_format=pixel_format, part_id=part_id, meta=meta)
        if timeout_ms is None and pixels.nbytes >= ZERO_COPY_MIN_BYTES:
            self._send(header, pixels, timeout_ms, copy=False, track=True).wait()
        else:
            self._send(header, pixels, timeout_ms, copy=True)

    def send_encoded(self, data: bytes, encoding: EncodedFormat, width: int, height: int, frame_id: str,
                     ts_ns: int | None = None, part_id: str | None = None, meta: dict | None = None,
                     timeout_ms: int | None = None) -> None:
        """Send an encoded image file as it is; `width`/`height` must be those of the decoded image.

        `bytes` are immutable, so they are always sent without a copy and without waiting.
        Raises TimeoutError as `send_image` does.
        """
        header = FrameHeader(camera_id=self.camera_id, frame_id=frame_id, ts_ns=_now_or(ts_ns), encoding=encoding,
                             width=width, height=height, part_id=part_id, meta=meta)
        self._send(header, data, timeout_ms, copy=False)

    def _send(self, header: FrameHeader, payload: bytes | np.ndarray, timeout_ms: int | None, copy: bool,
              track: bool = False) -> zmq.MessageTracker | None:
        self._socket.sndtimeo = -1 if timeout_ms is None else timeout_ms
        try:
            self._socket.send(header.encode(), zmq.SNDMORE)
            return self._socket.send(payload, copy=copy, track=track)
        except zmq.Again:
            raise TimeoutError(f"frame {header.frame_id} not accepted within {timeout_ms} ms: "
                               f"the receiver at {self.endpoint} is not reading (or not running, or it refused "
                               f"this camera's handshake: CURVE keys)") from None

    def close(self, linger_ms: int = 1000) -> None:
        """Close the socket; frames still queued get up to `linger_ms` to reach the daemon.

        With the publisher's own context (no `context` given) this waits for them; with a shared
        context, terminating that context waits (ZeroMQ lingers at context termination).
        """
        self._socket.close(linger=linger_ms)
        if self._own_context:
            self._context.term()

    def __enter__(self) -> "FramePublisher":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _frame_size(image: np.ndarray, pixel_format: PixelFormat) -> tuple[int, int]:
    """(height, width) of a raw frame, or ValueError if the array does not fit the format."""
    if image.dtype != np.uint8:
        raise ValueError(f"raw frames are uint8, got {image.dtype}")
    channels = 1 if pixel_format == "mono8" else 3
    fits = (image.ndim == 3 and image.shape[2] == channels) or (image.ndim == 2 and channels == 1)
    if not fits:
        raise ValueError(f"{pixel_format} needs shape [H, W{', 3' if channels == 3 else ''}], got {list(image.shape)}")
    return image.shape[0], image.shape[1]


def _now_or(ts_ns: int | None) -> int:
    return time.time_ns() if ts_ns is None else ts_ns

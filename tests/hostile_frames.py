"""Malformed and hostile frame messages, for the decoder's unit tests and the daemon's fuzz test."""

import json
import struct
import zlib

import cv2
import numpy as np

VALID = {"v": 1, "camera_id": "cam0", "frame_id": "f", "ts_ns": 1, "encoding": "raw", "width": 64, "height": 48,
         "pixel_format": "bgr8"}


def png_declaring(width: int, height: int, pixels: bytes = b"\0" * 1000) -> bytes:
    """A well-formed PNG whose header declares width x height 8-bit RGB pixels; IDAT holds
    `pixels` compressed (a decompression bomb when they are the whole image of zeros)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(pixels, 9))
            + chunk(b"IEND", b""))


def png_bomb(width: int, height: int) -> bytes:
    """A real, decodable all-black PNG: tiny on the wire, width*height*3 bytes once decoded."""
    rows = (b"\0" + b"\0" * (3 * width)) * height  # filter byte + pixels per row
    return png_declaring(width, height, rows)


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real 8x8 JPEG with its SOF0 size fields rewritten."""
    data = bytearray(cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def header(**fields) -> bytes:
    return json.dumps({**VALID, **fields}).encode()


def hostile_messages(rng: np.random.Generator, count: int, bomb_side: int) -> list[list[bytes]]:
    """`count` seeded messages of the kinds a broken or hostile camera sends. `bomb_side`: a real
    PNG bomb of that side (it decodes: within the limits it is a valid frame, else rejected)."""
    raw = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8).tobytes()
    jpeg = cv2.imencode(".jpg", np.frombuffer(raw, np.uint8).reshape(48, 64, 3))[1].tobytes()
    png = cv2.imencode(".png", np.frombuffer(raw, np.uint8).reshape(48, 64, 3))[1].tobytes()
    bomb = png_bomb(bomb_side, bomb_side)
    enc = {"pixel_format": None}

    def mutated(data: bytes) -> bytes:
        data = bytearray(data)
        for _ in range(int(rng.integers(1, 6))):
            at = int(rng.integers(0, len(data)))
            choice = rng.integers(0, 3)
            if choice == 0:
                data[at] = int(rng.integers(0, 256))
            elif choice == 1:
                del data[at]
            else:
                data.insert(at, int(rng.integers(0, 256)))
        return bytes(data)

    makers = [
        lambda i: [rng.bytes(int(rng.integers(0, 2000)))],                                  # random bytes
        lambda i: [rng.bytes(int(rng.integers(0, 200))) for _ in range(int(rng.integers(3, 6)))],  # part count
        lambda i: [header(frame_id=f"h{i}")],                                             # header only
        lambda i: [mutated(header(frame_id=f"m{i}")), raw],                               # mutated header
        lambda i: [header(frame_id=f"s{i}"), raw[:int(rng.integers(0, len(raw)))]],         # short raw
        lambda i: [header(frame_id=f"e{i}", encoding=str(rng.choice(["jpeg", "png"])), **enc), b""],  # empty file
        lambda i: [header(frame_id=f"r{i}", encoding="jpeg", **enc), rng.bytes(int(rng.integers(1, 3000)))],
        lambda i: [header(frame_id=f"t{i}", encoding="jpeg", **enc), jpeg[:int(rng.integers(1, len(jpeg)))]],
        lambda i: [header(frame_id=f"p{i}", encoding="png", **enc), mutated(png)],         # corrupt PNG
        lambda i: [header(frame_id=f"b{i}", encoding="png", width=30000, height=30000, **enc),
                   png_declaring(30000, 30000)],                                            # declared bomb
        lambda i: [header(frame_id=f"j{i}", encoding="jpeg", width=30000, height=30000, **enc),
                   jpeg_declaring(30000, 30000)],
        lambda i: [header(frame_id=f"d{i}", width=16384, height=16384), raw],              # huge raw claim
        lambda i: [header(frame_id=f"x{i}", width=int(rng.integers(-5, 5)), encoding="bmp"), raw],
        lambda i: [header(frame_id=f"k{i}", encoding="png", width=bomb_side, height=bomb_side, **enc), bomb],
        lambda i: [header(frame_id="z" * int(rng.integers(129, 400))), raw],               # long id
        lambda i: [header(frame_id=f"q{i}", meta={"note": "x" * int(rng.integers(17_000, 60_000))}), raw],
    ]
    messages = [makers[int(rng.integers(0, len(makers)))](i) for i in range(count)]
    big_meta = header(frame_id="meta", meta={"blob": "y" * 3_000_000})  # multi-MB header: refused unparsed
    return messages + [[big_meta, raw] for _ in range(10)]

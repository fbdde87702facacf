"""Soak: the daemon under a camera's steady frame rate for N minutes, its memory watched.

mosquitto and `edge serve` (harness.station: its own ports, no bundle watch) run on this machine;
real pictures (default: the in-repo hazelnut test set, looped) go to the daemon as raw bgr8 frames
at a fixed rate, and a subscriber counts the answers: a verdict, or an error report naming the
frame, once per (camera_id, frame_id) as delivery is at least once. The daemon's RSS (VmRSS, and
its peak VmHWM) is read every 10 s. Prints a row a minute; at the end, the RSS growth over the
second half of the run (after warming up) and the frames that got no answer: exit code 1 if any.
Too long for every `make bench`: `make bench BENCH_ARGS="--soak-minutes 30"` adds it, or alone:

    .venv/bin/python bench/soak.py --minutes 30 [--fps 10] [--bundle demo/bundle] [--images demo/hazelnut/test]
"""

import argparse
import queue
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.client as mqtt

from edge.replay import positive_float
from harness import HarnessError
from harness.broker import MosquittoBroker
from harness.feed import Feed
from harness.samples import list_samples
from harness.station import StationProcess, wait_until_online
from protocols.messages import ErrorReport, Result, error_topic, status_topic
from protocols.publisher import FramePublisher

REPO = Path(__file__).resolve().parents[1]
STATION_ID = "soak"
CAMERA_ID = "cam0"
READ_EVERY_S = 10.0
ROW_EVERY_S = 60.0
SEND_TIMEOUT_MS = 30_000       # a daemon that takes no frame for this long is stuck: stop sending
ANSWER_IDLE_TIMEOUT_S = 60.0   # after the last frame: no new answer for this long, the rest are not coming
MIN_GROWTH_SPAN_S = 60.0       # a shorter second half gives no meaningful MB/hour


class Answers:
    """What the subscriber received: one answer per (camera_id, frame_id), the first one."""

    def __init__(self, prefix: str) -> None:
        self.verdicts: dict[tuple[str, str], str] = {}
        self.errors: dict[tuple[str, str], str] = {}  # the reason
        self.answered: set[tuple[str, str]] = set()
        self._error_topic, self._status_topic = error_topic(prefix), status_topic(prefix)

    def take(self, message: mqtt.MQTTMessage) -> None:
        if message.topic == self._status_topic:
            return
        if message.topic == self._error_topic:
            report = ErrorReport.model_validate_json(message.payload)
            if report.frame_id is None:  # about the station, not a frame
                return
            key = (report.camera_id, report.frame_id)
            self.errors.setdefault(key, report.reason)
        else:
            result = Result.model_validate_json(message.payload)
            key = (result.camera_id, result.frame_id)
            self.verdicts.setdefault(key, result.verdict)
        self.answered.add(key)


@dataclass(frozen=True)
class Reading:
    elapsed_s: float  # since the first frame
    rss_mb: float
    peak_mb: float
    sent: int
    answers: int


class Soak:
    """The clock of the run: between frames it takes answers and reads the daemon's memory on
    schedule (every READ_EVERY_S, a table row every ROW_EVERY_S; a late reading skips the slots it
    missed)."""

    def __init__(self, station: StationProcess, feed: Feed, answers: Answers) -> None:
        self.station, self.feed, self.answers = station, feed, answers
        self.readings: list[Reading] = []
        self.sent = 0
        self.start = time.monotonic()
        self._next_reading = self.start + READ_EVERY_S
        self._next_row = self.start + ROW_EVERY_S

    def wait_until(self, deadline: float) -> None:
        """Until `deadline`. Answers already waiting are taken even when it has passed, so that the
        counts keep up while the sender runs late."""
        while True:
            now = time.monotonic()
            if now >= self._next_reading:
                self._next_reading = _next_slot(self._next_reading, now, READ_EVERY_S)
                reading = self.read()
                if now >= self._next_row:
                    self._next_row = _next_slot(self._next_row, now, ROW_EVERY_S)
                    print_row(f"{reading.elapsed_s / 60:.1f}", reading)
            try:
                message = self.feed.inbox.get(timeout=max(0.0, min(deadline, self._next_reading) - now))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    return
                continue
            self.answers.take(message)

    def read(self) -> Reading:
        self.station.check_running()
        memory = self.station.memory()
        reading = Reading(time.monotonic() - self.start, memory.rss_mb, memory.peak_mb, self.sent,
                          len(self.answers.answered))
        self.readings.append(reading)
        return reading


def _next_slot(slot: float, now: float, every: float) -> float:
    """The first slot after `now` on the grid of `slot` + k · `every`."""
    return slot + every * (1 + (now - slot) // every)


def print_row(label: str, reading: Reading) -> None:
    print(f"| {label} | {reading.rss_mb:.0f} | {reading.peak_mb:.0f} | {reading.sent} | {reading.answers} |",
          flush=True)


def read_frames(images: Path) -> list[np.ndarray]:
    frames = [cv2.imread(str(sample.path), cv2.IMREAD_COLOR) for sample in list_samples(images)]
    if not frames or any(frame is None for frame in frames):
        sys.exit(f"soak: no readable images in {images} (or one of them is not readable)")
    return frames


def run(soak: Soak, frames: list[np.ndarray], fps: float, count: int) -> float:
    """Frame n goes at start + n / fps (a fixed schedule: a late frame goes at once, no drift);
    then the answers still due come, until none has for ANSWER_IDLE_TIMEOUT_S. Returns how long
    the sending took (s)."""
    camera = FramePublisher(soak.station.endpoint, CAMERA_ID)
    try:
        for n in range(count):
            soak.wait_until(soak.start + n / fps)
            try:
                camera.send_image(frames[n % len(frames)], f"{n:06d}", timeout_ms=SEND_TIMEOUT_MS)
            except TimeoutError as err:
                print(f"soak: {err}; sending stopped", file=sys.stderr)
                break
            soak.sent += 1
        sending_s = time.monotonic() - soak.start
    finally:
        camera.close(linger_ms=SEND_TIMEOUT_MS)  # frames still queued get as long to go out as a send
    answered, last_progress = len(soak.answers.answered), time.monotonic()
    while answered < soak.sent and time.monotonic() - last_progress < ANSWER_IDLE_TIMEOUT_S:
        soak.wait_until(time.monotonic() + 0.5)
        if len(soak.answers.answered) > answered:
            answered, last_progress = len(soak.answers.answered), time.monotonic()
    return sending_s


def report(soak: Soak, sending_s: float) -> list[str]:
    """Prints the figures after the table; returns the ids of the frames that got no answer."""
    end = soak.read()
    print_row(f"end ({end.elapsed_s / 60:.1f})", end)
    # A leak grows steadily; warming up (allocator, page cache of the outbox) happens early. So the
    # growth is taken over the second half of the run.
    halfway = next(r for r in soak.readings if r.elapsed_s >= end.elapsed_s / 2)
    growth, span_s = end.rss_mb - halfway.rss_mb, end.elapsed_s - halfway.elapsed_s
    rate = f"{growth / span_s * 3600:+.1f} MB/hour" if span_s >= MIN_GROWTH_SPAN_S else "MB/hour n/a"
    print(f"\nRSS at {halfway.elapsed_s / 60:.1f} min (half the run): {halfway.rss_mb:.0f} MB; at the end: "
          f"{end.rss_mb:.0f} MB (peak {end.peak_mb:.0f} MB); growth over the second half: **{growth:+.1f} MB** "
          f"over {span_s / 60:.1f} min ({rate}).")
    answers = soak.answers
    verdicts = list(answers.verdicts.values())
    missing = [f"{n:06d}" for n in range(soak.sent) if (CAMERA_ID, f"{n:06d}") not in answers.answered]
    print(f"Frames sent {soak.sent} ({soak.sent / sending_s:.2f} frames/s); verdicts "
          f"{len(verdicts)} (pass {verdicts.count('pass')}, fail {verdicts.count('fail')}); error reports "
          f"naming a frame {len(answers.errors)}; **missing answers {len(missing)}**"
          + (f" (first: {', '.join(missing[:10])})." if missing else "."))
    return missing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=positive_float, default=30.0, help="how long frames are sent")
    parser.add_argument("--fps", type=positive_float, default=10.0, help="frames per second")
    parser.add_argument("--bundle", type=Path, default=REPO / "demo" / "bundle", help="model bundle directory")
    parser.add_argument("--images", type=Path, default=REPO / "demo" / "hazelnut" / "test",
                        help="folder of pictures, sent in path order and looped")
    args = parser.parse_args()
    frames = read_frames(args.images)
    height, width = frames[0].shape[:2]
    count = max(1, round(args.minutes * 60 * args.fps))

    print(f"### Soak: `edge serve` at {args.fps:g} frames/s for {args.minutes:g} min\n")
    print(f"{count} raw bgr8 frames ({len(frames)} pictures from {args.images}, {width}×{height}, looped) to "
          f"bundle {args.bundle}; answers counted at an MQTT subscriber; the daemon's RSS in MB.\n")
    print("| min | RSS MB | peak RSS MB | frames sent | answers |")
    print("|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        workdir = Path(tmp)
        try:
            with MosquittoBroker(workdir) as broker:
                station = StationProcess(STATION_ID, args.bundle.resolve(), broker, workdir, workdir / "edge.log")
                feed = Feed(broker.port, station.prefix)
                feed.start()
                station.start()
                try:
                    wait_until_online(feed, station, show=False)
                    soak = Soak(station, feed, Answers(station.prefix))
                    missing = report(soak, run(soak, frames, args.fps, count))
                finally:
                    station.stop()
                    feed.stop()
        except HarnessError as err:
            sys.exit(f"soak: {err}")
    if missing:
        sys.exit(f"soak: {len(missing)} of {soak.sent} frames got no answer")


if __name__ == "__main__":
    main()

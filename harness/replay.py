"""Replay the samples to a station and print each verdict live, next to its ground truth."""

import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq

from edge.replay import replay
from edge.watch import GREEN, RED, RESET, format_message, format_result_line
from harness.feed import Feed
from harness.samples import Sample
from harness.station import StationProcess
from protocols.messages import Result

CAMERA_ID = "cam0"
RESULT_IDLE_TIMEOUT_S = 60.0  # no new verdict for this long: the rest are not coming


class ReplayThread(threading.Thread):
    """edge.replay.replay in the background, so verdicts print while frames are still going out."""

    def __init__(self, images: Path, endpoint: str, fps: float | None, limit: int) -> None:
        super().__init__(name="replay", daemon=True)
        self._images, self._endpoint, self._fps, self._limit = images, endpoint, fps, limit
        self.sent: int | None = None
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            self.sent = replay(self._images, self._endpoint, self._fps, camera_id=CAMERA_ID, limit=self._limit)
        except (OSError, ValueError, zmq.ZMQError) as err:  # TimeoutError is an OSError
            self.error = err


@dataclass
class Run:
    results: dict[int, Result]  # by frame index
    sent: int | None
    seconds: float  # first frame sent → last verdict received


def replay_and_collect(samples: list[Sample], images: Path, station: StationProcess, feed: Feed,
                       fps: float | None) -> Run:
    """Replay the samples and print each verdict as it arrives, until all are in or none has
    come for RESULT_IDLE_TIMEOUT_S."""
    color = sys.stdout.isatty()
    results: dict[int, Result] = {}
    sender = ReplayThread(images, station.endpoint, fps, len(samples))
    started = last = time.monotonic()
    sender.start()
    while len(results) < len(samples) and sender.error is None:
        try:
            message = feed.inbox.get(timeout=1.0)
        except queue.Empty:
            station.check_running()
            if time.monotonic() - last > RESULT_IDLE_TIMEOUT_S:
                print(f"demo: no verdict for {RESULT_IDLE_TIMEOUT_S:.0f} s; giving up", file=sys.stderr)
                break
            continue
        line, is_result = format_message(station.prefix, message.topic, message.payload, color)
        if not is_result:
            print(line, flush=True)
            continue
        result = Result.model_validate_json(message.payload)
        index = int(result.frame_id)
        if index in results:  # at-least-once delivery: a repeat adds nothing
            continue
        results[index] = result
        last = time.monotonic()
        print(f"{format_result_line(result, color)}  {samples[index].name:<16} "
              f"truth {samples[index].truth:<8} {_mark(samples[index].judged_right(result), color)}", flush=True)
    sender.join(timeout=1.0)
    if sender.error is not None:
        print(f"demo: replay failed: {sender.error}", file=sys.stderr)
    return Run(results, sender.sent, (last - started) if results else 0.0)


def _mark(right: bool, color: bool) -> str:
    mark = "✓" if right else "✗"
    return f"{GREEN if right else RED}{mark}{RESET}" if color else mark

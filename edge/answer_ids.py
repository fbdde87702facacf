"""Ids the station gives its answers (results and error reports): unique, and sorting by time.

The camera's (camera_id, frame_id) cannot be the de-duplication key: a camera that restarts its
counter would make a subscriber drop real verdicts. The id is kept with the answer in the outbox,
so a redelivery carries the same id.
"""

import os
import threading
import time


class AnswerIds:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ns = 0
        # Tells two processes apart (two stations, or one restarted after its clock went back).
        self._process = os.urandom(4).hex()

    def next(self) -> str:
        """`<ns since the epoch, 20 digits>-<process tag>`: strictly increasing within a process."""
        with self._lock:
            self._last_ns = max(time.time_ns(), self._last_ns + 1)
            return f"{self._last_ns:020d}-{self._process}"

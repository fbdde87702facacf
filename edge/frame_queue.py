"""The bounded queue between ingest and inference, with its backpressure policy, and the
micro-batching read (up to max_batch frames, waiting at most max_wait after the first)."""

import threading
import time
from collections import deque
from typing import Generic, Literal, TypeVar

Item = TypeVar("Item")


class FrameQueue(Generic[Item]):
    def __init__(self, capacity: int, policy: Literal["block", "latest"]):
        self.capacity, self.policy = capacity, policy
        self._items: deque[Item] = deque()
        self._changed = threading.Condition()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Item) -> Item | None:
        """Enqueue. `block` waits for room (so ZeroMQ stops reading and the sender feels the
        pressure); `latest` never waits and returns the oldest item it dropped, if any."""
        with self._changed:
            dropped = None
            if self.policy == "block":
                self._changed.wait_for(lambda: len(self._items) < self.capacity)
            elif len(self._items) >= self.capacity:
                dropped = self._items.popleft()
            self._items.append(item)
            self._changed.notify_all()
            return dropped

    def get_batch(self, max_batch: int, max_wait_s: float, idle_timeout_s: float) -> list[Item]:
        """Up to max_batch items; [] if nothing arrived within idle_timeout_s."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._items, timeout=idle_timeout_s):
                return []
            deadline = time.monotonic() + max_wait_s
            while len(self._items) < max_batch and (remaining := deadline - time.monotonic()) > 0:
                self._changed.wait(remaining)
            batch = [self._items.popleft() for _ in range(min(max_batch, len(self._items)))]
            self._changed.notify_all()
            return batch

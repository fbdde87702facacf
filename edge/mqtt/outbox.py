"""A durable FIFO of outgoing MQTT messages in SQLite (`<state_dir>/outbox.sqlite3`), and a journal
of the frames the station accepted but has not answered yet.

Durability of messages: WAL journal with `synchronous=FULL`, so every commit fsyncs the WAL before
it returns and a verdict survives a SIGKILL *and* a power cut. (`NORMAL` with WAL survives a process
crash but may roll back the last commits on power loss, which is exactly what the outbox is for.)
The cost is one fsync per `put` and per `remove`; `put_answers` writes a whole micro-batch with one.

Journal of accepted frames (table `accepted`): one row per incoming frame, deleted in the same
transaction that puts the frame's answer in the outbox, so a frame accepted before a crash is still
answered (with an error report) at the next start. It is written on the receiver thread for every
frame, through a second connection with `synchronous=NORMAL`: no fsync, and still durable across a
crash or SIGKILL of the process. A power cut may lose its last rows; those frames then go without
an answer, which the PLC handles like any part without one. An fsync per frame is not worth that.

Quota: at most `max_messages` pending messages and `max_bytes` payload bytes. A put that would
exceed either deletes the oldest pending messages in the same transaction. During a long broker
outage the newest verdicts are what the line and MES still need; the PLC has long since treated the
parts without an answer as rejects, and a station must never stop inspecting or die of a full disk.
A put never evicts what it adds, so a message larger than `max_bytes` is still stored (alone).
Evictions are counted (`evicted_total`, `take_evicted`) so they can be reported.

File size: SQLite reuses the pages that removes and evictions free, so the database stays at its
high-water mark, which the quota bounds. The WAL is reused from its start after each automatic
checkpoint (every 1000 pages, about 4 MB); `journal_size_limit` truncates it back to
`WAL_SIZE_LIMIT` when a large message or a delayed checkpoint made it grow beyond that.

Ids come from AUTOINCREMENT so they never repeat, even after the table empties: the sender's
"everything after id N" cursor relies on that.

The count and byte total of pending messages are kept in memory, so this object must be the only
writer of its file.
"""

# The `bytes` property below would otherwise shadow the builtin in the methods' annotations.
from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    topic   TEXT    NOT NULL,
    payload BLOB    NOT NULL,
    qos     INTEGER NOT NULL,
    retain  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS accepted (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    camera_id   TEXT    NOT NULL,
    frame_id    TEXT    NOT NULL,
    part_id     TEXT,
    accepted_ns INTEGER NOT NULL
);
"""

# About one automatic checkpoint's worth of WAL (1000 pages of 4 KiB): normal operation never
# truncates and regrows it, and anything beyond is given back after the next checkpoint.
WAL_SIZE_LIMIT = 4 << 20
# The two connections wait for each other's write transactions, which last about one fsync;
# waiting seconds means the disk is failing, and the caller should hear about it.
_BUSY_TIMEOUT_S = 5.0


class OutboxError(Exception):
    """The outbox database cannot be opened or is damaged; the message names the file."""


@dataclass(frozen=True)
class OutboxMessage:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True)
class AcceptedFrame:
    id: int
    camera_id: str
    frame_id: str
    part_id: str | None
    accepted_ns: int  # wall clock (time.time_ns): still meaningful after a restart


class Outbox:
    """Thread-safe: two connections, each serialised by its own lock. Messages (puts from the
    publisher thread, reads and removes from the MQTT sender) go through the `FULL` connection;
    journal inserts (the receiver thread) through the `NORMAL` one. A journal insert still waits
    for SQLite's write lock while a batch of verdicts commits (about one fsync)."""

    FILENAME = "outbox.sqlite3"

    def __init__(self, state_dir: Path, max_messages: int = 100_000, max_bytes: int = 1 << 30) -> None:
        if max_messages < 1 or max_bytes < 1:
            raise ValueError(f"outbox quota must be positive, got max_messages={max_messages}, "
                             f"max_bytes={max_bytes}")
        self.path = Path(state_dir) / self.FILENAME
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._lock = threading.Lock()  # the FULL connection and the counters
        self._journal_lock = threading.Lock()  # the NORMAL connection
        self._evicted_total = 0
        self._evicted_reported = 0
        with contextlib.ExitStack() as on_error:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = self._connect()
                on_error.callback(self._db.close)
                mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode != "wal":
                    raise sqlite3.OperationalError(f"WAL journal not available (got {mode!r})")
                self._db.execute("PRAGMA synchronous=FULL")
                problems = [row[0] for row in self._db.execute("PRAGMA quick_check")]
                if problems != ["ok"]:
                    raise sqlite3.DatabaseError("; ".join(problems[:3]))
                self._db.executescript(_SCHEMA)
                self._count, self._bytes = self._db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox").fetchone()
                self._journal = self._connect()
                on_error.callback(self._journal.close)
                self._journal.execute("PRAGMA synchronous=NORMAL")
            except (OSError, sqlite3.Error) as err:
                raise OutboxError(
                    f"cannot use outbox {self.path}: {err} (move it aside to start with an empty "
                    "outbox; its pending messages would not be sent)") from err
            on_error.pop_all()

    def _connect(self) -> sqlite3.Connection:
        # Autocommit: each statement is its own transaction unless a BEGIN says otherwise.
        db = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None,
                             check_same_thread=False)
        # Per connection: whichever connection restarts the WAL after a checkpoint truncates it.
        db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        return db

    def put(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Append a message, evicting the oldest if the quota needs it; it is on disk when this
        returns. Returns its id."""
        return self._append([(topic, payload, qos, retain)], settle=[])[0]

    def put_answers(self, messages: list[tuple[str, bytes]], settle: list[int]) -> list[int]:
        """Append QoS-1, non-retained (topic, payload) messages and delete the journal rows
        `settle` (ids already gone are ignored) in one transaction: a frame leaves the journal
        exactly when its answer is on disk. Returns the new ids in order."""
        return self._append([(topic, payload, 1, False) for topic, payload in messages], settle)

    def _append(self, messages: list[tuple[str, bytes, int, bool]], settle: list[int]) -> list[int]:
        added_bytes = sum(len(payload) for _, payload, _, _ in messages)
        with self._lock:
            # IMMEDIATE: take the write lock now (waiting for the journal connection), rather than
            # fail with SQLITE_BUSY when the eviction's read turns into a write.
            self._db.execute("BEGIN IMMEDIATE")
            try:
                evicted, evicted_bytes = self._evict_oldest(len(messages), added_bytes)
                ids = [self._db.execute(
                    "INSERT INTO outbox (topic, payload, qos, retain) VALUES (?, ?, ?, ?)",
                    (topic, payload, qos, int(retain))).lastrowid
                    for topic, payload, qos, retain in messages]
                self._db.executemany("DELETE FROM accepted WHERE id = ?", [(row_id,) for row_id in settle])
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite may have rolled back already
                    self._db.execute("ROLLBACK")
                raise
            self._count += len(messages) - evicted
            self._bytes += added_bytes - evicted_bytes
            self._evicted_total += evicted
        return ids

    def _evict_oldest(self, adding: int, adding_bytes: int) -> tuple[int, int]:
        """Delete the oldest messages until `adding` more messages of `adding_bytes` fit the quota,
        or none is left. Caller holds the lock inside a transaction. Returns (count, bytes) deleted."""
        excess = self._count + adding - self.max_messages
        excess_bytes = self._bytes + adding_bytes - self.max_bytes
        if excess <= 0 and excess_bytes <= 0:
            return 0, 0
        evicted = evicted_bytes = 0
        last_id = None
        oldest_first = self._db.execute("SELECT id, LENGTH(payload) FROM outbox ORDER BY id")
        for message_id, size in oldest_first:
            if evicted >= excess and evicted_bytes >= excess_bytes:
                break
            last_id = message_id
            evicted += 1
            evicted_bytes += size
        oldest_first.close()
        if last_id is not None:
            self._db.execute("DELETE FROM outbox WHERE id <= ?", (last_id,))
        return evicted, evicted_bytes

    def pending(self, limit: int, after_id: int = 0) -> list[OutboxMessage]:
        """Up to `limit` messages with id > `after_id`, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, qos, retain FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit)).fetchall()
        return [OutboxMessage(id, topic, payload, qos, bool(retain))
                for id, topic, payload, qos, retain in rows]

    def remove(self, message_id: int) -> None:
        """Delete a message; nothing to do if it is gone already (evicted while in flight)."""
        with self._lock:
            row = self._db.execute("SELECT LENGTH(payload) FROM outbox WHERE id = ?",
                                   (message_id,)).fetchone()
            if row is None:
                return
            self._db.execute("DELETE FROM outbox WHERE id = ?", (message_id,))
            self._count -= 1
            self._bytes -= row[0]

    def journal_accepted(self, camera_id: str, frame_id: str, part_id: str | None) -> int:
        """Record an accepted frame (no fsync: see the module docstring). Returns the id that
        `put_answers` settles."""
        with self._journal_lock:
            return self._journal.execute(
                "INSERT INTO accepted (camera_id, frame_id, part_id, accepted_ns) VALUES (?, ?, ?, ?)",
                (camera_id, frame_id, part_id, time.time_ns())).lastrowid

    def unanswered(self) -> list[AcceptedFrame]:
        """Journaled frames not settled yet, oldest first; at start, those a previous run left."""
        with self._journal_lock:
            rows = self._journal.execute(
                "SELECT id, camera_id, frame_id, part_id, accepted_ns FROM accepted ORDER BY id").fetchall()
        return [AcceptedFrame(*row) for row in rows]

    # Counters are read without a lock: a Prometheus scrape must never wait for an fsync.

    def __len__(self) -> int:
        return self._count

    @property
    def bytes(self) -> int:
        """Payload bytes of the pending messages."""
        return self._bytes

    @property
    def evicted_total(self) -> int:
        """Messages evicted by the quota since this outbox was opened."""
        return self._evicted_total

    def take_evicted(self) -> int:
        """Messages evicted since the previous call (for one aggregated report)."""
        with self._lock:
            evicted = self._evicted_total - self._evicted_reported
            self._evicted_reported = self._evicted_total
        return evicted

    def close(self) -> None:
        """Idempotent. Stop the link that drains this outbox first."""
        with self._lock, self._journal_lock:
            self._journal.close()
            self._db.close()

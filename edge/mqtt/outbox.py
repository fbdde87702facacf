"""A durable FIFO of outgoing MQTT messages in SQLite (`<state_dir>/outbox.sqlite3`).

Durability: WAL journal with `synchronous=FULL`, so every `put` fsyncs the WAL before it returns
and a verdict survives a SIGKILL *and* a power cut. (`NORMAL` with WAL survives a process crash
but may roll back the last commits on power loss, which is exactly what the outbox is for.)
The cost is one fsync per put and per remove: milliseconds, far below the frame rate budget.

Ids come from AUTOINCREMENT so they never repeat, even after the table empties: the sender's
"everything after id N" cursor relies on that.
"""

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    topic   TEXT    NOT NULL,
    payload BLOB    NOT NULL,
    qos     INTEGER NOT NULL,
    retain  INTEGER NOT NULL
)
"""


class OutboxError(Exception):
    """The outbox database cannot be opened or is damaged; the message names the file."""


@dataclass(frozen=True)
class OutboxMessage:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool


class Outbox:
    """Thread-safe: one connection, serialised by a lock (puts come from the daemon's worker,
    reads and removes from the MQTT sender)."""

    FILENAME = "outbox.sqlite3"

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / self.FILENAME
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit: each statement is its own transaction, durable when it returns.
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise sqlite3.OperationalError(f"WAL journal not available (got {mode!r})")
            self._db.execute("PRAGMA synchronous=FULL")
            problems = [row[0] for row in self._db.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError("; ".join(problems[:3]))
            self._db.execute(_SCHEMA)
        except (OSError, sqlite3.Error) as err:
            raise OutboxError(
                f"cannot use outbox {self.path}: {err} (move it aside to start with an empty "
                "outbox; its pending messages would not be sent)") from err

    def put(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Append a message; it is on disk when this returns. Returns its id."""
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO outbox (topic, payload, qos, retain) VALUES (?, ?, ?, ?)",
                (topic, payload, qos, int(retain)))
            return cursor.lastrowid

    def pending(self, limit: int, after_id: int = 0) -> list[OutboxMessage]:
        """Up to `limit` messages with id > `after_id`, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, qos, retain FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit)).fetchall()
        return [OutboxMessage(id, topic, payload, qos, bool(retain))
                for id, topic, payload, qos, retain in rows]

    def remove(self, message_id: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE id = ?", (message_id,))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]

    def close(self) -> None:
        """Idempotent. Stop the link that drains this outbox first."""
        with self._lock:
            self._db.close()

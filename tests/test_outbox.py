"""The SQLite outbox on real files: quota and eviction, counters, the journal of accepted frames
(atomic settling, survival of a SIGKILL), and a WAL that stays bounded."""

import queue
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest

from edge.mqtt.outbox import WAL_SIZE_LIMIT, Outbox

pytestmark = pytest.mark.timeout(120)


def stored_totals(state_dir: Path) -> tuple[int, int]:
    """(count, payload bytes) of pending messages, read by a connection of its own."""
    with closing(sqlite3.connect(state_dir / Outbox.FILENAME)) as db:
        return db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox").fetchone()


def payloads(box: Outbox) -> list[bytes]:
    return [m.payload for m in box.pending(1000)]


# --- quota -----------------------------------------------------------------------------------------

def test_quota_by_count_evicts_the_oldest(tmp_path):
    box = Outbox(tmp_path, max_messages=3)
    ids = [box.put("t", f"m{i}".encode()) for i in range(5)]
    assert ids == sorted(set(ids))
    assert [m.id for m in box.pending(10)] == ids[2:]
    assert payloads(box) == [b"m2", b"m3", b"m4"]
    assert (len(box), box.bytes) == stored_totals(tmp_path) == (3, 6)
    assert box.evicted_total == 2
    assert box.take_evicted() == 2
    assert box.take_evicted() == 0

    newest = box.put("t", b"m5")
    assert newest > ids[-1]
    assert payloads(box) == [b"m3", b"m4", b"m5"]
    assert (box.evicted_total, box.take_evicted(), box.take_evicted()) == (3, 1, 0)
    box.close()


def test_quota_by_bytes_evicts_the_oldest(tmp_path):
    box = Outbox(tmp_path, max_bytes=100)
    for name in b"abcd":
        box.put("t", bytes([name]) * 30)
    assert payloads(box) == [b"b" * 30, b"c" * 30, b"d" * 30]  # 120 > 100: `a` went
    assert (len(box), box.bytes) == stored_totals(tmp_path) == (3, 90)

    box.put("t", b"e" * 70)  # 160 > 100: `b` and `c` must go, exactly 100 is fine
    assert payloads(box) == [b"d" * 30, b"e" * 70]
    assert (len(box), box.bytes) == stored_totals(tmp_path) == (2, 100)
    assert box.evicted_total == box.take_evicted() == 3
    box.close()


def test_a_message_larger_than_the_quota_is_stored_alone(tmp_path):
    box = Outbox(tmp_path, max_bytes=100)
    for _ in range(3):
        box.put("t", b"small")
    big = box.put("t", b"B" * 500)
    assert [m.id for m in box.pending(10)] == [big]
    assert (len(box), box.bytes) == stored_totals(tmp_path) == (1, 500)

    box.put("t", b"next")
    assert payloads(box) == [b"next"]
    assert box.evicted_total == 4
    box.close()


def test_remove_keeps_the_counters_and_ignores_evicted_ids(tmp_path):
    box = Outbox(tmp_path, max_messages=2)
    first, second, third = (box.put("t", b"x" * size) for size in (1, 20, 300))
    box.remove(first)  # evicted by `third` while it was in flight, say
    box.remove(second)
    assert (len(box), box.bytes) == stored_totals(tmp_path) == (1, 300)
    box.remove(third)
    assert (len(box), box.bytes) == stored_totals(tmp_path) == (0, 0)
    box.close()


def test_counters_are_restored_when_reopening(tmp_path):
    box = Outbox(tmp_path)
    ids = [box.put("t", b"x" * size) for size in (10, 20, 30, 40)]
    box.remove(ids[1])
    box.close()

    box = Outbox(tmp_path, max_messages=3, max_bytes=85)
    assert (len(box), box.bytes) == stored_totals(tmp_path) == (3, 80)
    assert box.evicted_total == 0
    # The quota starts from the restored counters: 80 + 15 bytes > 85 evicts the oldest.
    box.put("t", b"y" * 15)
    assert payloads(box) == [b"x" * 30, b"x" * 40, b"y" * 15]
    assert (len(box), box.bytes, box.evicted_total) == (3, 85, 1)
    box.close()


def test_a_database_of_the_previous_version_opens(tmp_path):
    with closing(sqlite3.connect(tmp_path / Outbox.FILENAME, isolation_level=None)) as db:
        db.execute("CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, "
                   "payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL)")
        db.execute("INSERT INTO outbox (topic, payload, qos, retain) VALUES ('t', x'0102', 1, 0)")

    box = Outbox(tmp_path)
    assert [(m.topic, m.payload) for m in box.pending(10)] == [("t", b"\x01\x02")]
    assert (len(box), box.bytes) == (1, 2)
    frame = box.journal_accepted("cam0", "f1", None)
    assert [f.id for f in box.unanswered()] == [frame]
    box.close()


# --- journal of accepted frames ----------------------------------------------------------------------

def test_put_answers_writes_messages_and_settles_the_journal(tmp_path):
    box = Outbox(tmp_path)
    before = time.time_ns()
    a = box.journal_accepted("cam0", "f1", "part-1")
    b = box.journal_accepted("cam0", "f2", None)
    c = box.journal_accepted("cam1", "f3", None)
    after = time.time_ns()

    ids = box.put_answers([("r/cam0", b"answer f1"), ("r/cam0", b"answer f2")], settle=[a, b, 999])
    assert ids == sorted(ids) and len(ids) == 2
    assert [(m.id, m.topic, m.payload, m.qos, m.retain) for m in box.pending(10)] == [
        (ids[0], "r/cam0", b"answer f1", 1, False), (ids[1], "r/cam0", b"answer f2", 1, False)]
    [left] = box.unanswered()
    assert (left.id, left.camera_id, left.frame_id, left.part_id) == (c, "cam1", "f3", None)
    assert before <= left.accepted_ns <= after
    assert (len(box), box.bytes) == stored_totals(tmp_path)
    box.close()


@pytest.mark.parametrize("bad", ["message", "settle id"])
def test_put_answers_is_all_or_nothing(tmp_path, bad):
    box = Outbox(tmp_path, max_messages=3)
    old = [box.put("t", f"old{i}".encode()) for i in range(3)]  # full: the batch must evict
    frames = [box.journal_accepted("cam0", f"f{i}", None) for i in range(2)]
    messages = [("t", b"new0"), ("t", b"new1")]
    settle = list(frames)
    if bad == "message":
        messages.append((None, b"no topic"))  # NOT NULL fails after the eviction and two inserts
    else:
        settle.append(object())  # cannot be bound: fails after all the inserts and two deletes

    with pytest.raises(sqlite3.Error):
        box.put_answers(messages, settle)
    assert [m.id for m in box.pending(10)] == old
    assert [f.id for f in box.unanswered()] == frames
    assert (len(box), box.bytes) == stored_totals(tmp_path) == (3, 12)
    assert box.evicted_total == 0

    # Nothing was left half open: the same batch without the bad part goes through.
    new = box.put_answers(messages[:2], frames)
    assert payloads(box) == [b"old2", b"new0", b"new1"]
    assert new[0] > old[-1]
    assert box.unanswered() == []
    assert (len(box), box.bytes, box.evicted_total) == (3, 12, 2)
    box.close()


JOURNAL_THEN_SIGKILL = textwrap.dedent("""
    import os, signal, sys
    from edge.mqtt.outbox import Outbox

    box = Outbox(sys.argv[1])
    answered = box.journal_accepted("cam0", "f1", None)
    box.put_answers([("r/cam0", b"answer f1")], settle=[answered])
    box.journal_accepted("cam0", "f2", "part-7")
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_frame_journaled_before_a_sigkill_is_unanswered_after_reopening(tmp_path):
    process = subprocess.run([sys.executable, "-c", JOURNAL_THEN_SIGKILL, str(tmp_path)],
                             capture_output=True, timeout=60)
    assert process.returncode == -signal.SIGKILL, process.stderr.decode()[-2000:]

    box = Outbox(tmp_path)
    assert [(f.camera_id, f.frame_id, f.part_id) for f in box.unanswered()] == [("cam0", "f2", "part-7")]
    assert payloads(box) == [b"answer f1"]
    # The daemon's start: answer it and settle it in one go.
    [frame] = box.unanswered()
    box.put_answers([("errors", b"report f2")], settle=[frame.id])
    box.close()
    assert Outbox(tmp_path).unanswered() == []


def test_journal_and_answers_from_two_threads(tmp_path):
    """The receiver journals while the publisher settles: the two connections wait for each other."""
    box = Outbox(tmp_path)
    count = 300
    accepted: queue.Queue[int] = queue.Queue()

    def receiver() -> None:
        for i in range(count):
            accepted.put(box.journal_accepted("cam0", str(i), None))

    thread = threading.Thread(target=receiver)
    thread.start()
    answered = 0
    while answered < count:
        batch = [accepted.get(timeout=10)]
        while len(batch) < 8 and not accepted.empty():
            batch.append(accepted.get())
        box.put_answers([("r", b"answer")] * len(batch), settle=batch)
        answered += len(batch)
    thread.join(10)
    assert box.unanswered() == []
    assert (len(box), box.bytes) == stored_totals(tmp_path) == (count, count * len(b"answer"))
    box.close()


# --- file size ---------------------------------------------------------------------------------------

def test_wal_stays_bounded_over_many_put_remove_cycles(tmp_path):
    box = Outbox(tmp_path)
    wal = tmp_path / (Outbox.FILENAME + "-wal")
    with closing(sqlite3.connect(tmp_path / Outbox.FILENAME)) as db:
        page = db.execute("PRAGMA page_size").fetchone()[0]
        checkpoint_pages = db.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
    batch, size = 50, 10_000
    # A WAL grows to the automatic checkpoint's size (plus the transaction that crossed it) and is
    # then reused; anything beyond must be truncated away by journal_size_limit.
    bound = WAL_SIZE_LIMIT + (checkpoint_pages + batch * (size // page + 2)) * (page + 24)

    # One transaction far larger than the limit first: the WAL must shrink back afterwards.
    box.remove(box.put("t", bytes(4 * WAL_SIZE_LIMIT)))
    assert wal.stat().st_size > 4 * WAL_SIZE_LIMIT

    for cycle in range(5_000 // batch):
        frames = [box.journal_accepted("cam0", f"{cycle}-{i}", None) for i in range(batch)]
        for message_id in box.put_answers([("r", bytes(size))] * batch, settle=frames):
            box.remove(message_id)
    assert len(box) == 0 and box.unanswered() == []
    assert wal.stat().st_size <= bound
    box.close()

"""Test helpers for `edge serve` as a separate process: a configured daemon, the answers a
subscriber saw, and bundles whose graph misbehaves on purpose (real exports of the tiny run)."""

import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
from mqtt_broker import Subscriber

from harness.broker import Broker
from harness.station import StationProcess

from protocols.bundle import MANIFEST_DIGEST_NAME, MANIFEST_NAME, BundleFile, Manifest, sha256_file
from protocols.messages import ErrorReport, Result

STATION = "t1"
PREFIX = f"inspection/{STATION}"
READY_TIMEOUT_S = 120


class DaemonProcess(StationProcess):
    """The harness's `edge serve` subprocess, with what tests look at: its log, its outbox
    database, its memory, signals."""

    def __init__(self, workdir: Path, bundle: Path, broker: Broker, reload_watch: bool = False,
                 sections: dict[str, dict] | None = None, **inference: object):
        settings = {"reload_watch": reload_watch, "inference": inference, **(sections or {})}
        settings["mqtt"] = {"keepalive_s": 2, "reconnect_min_s": 0.1, "reconnect_max_s": 1.0}
        super().__init__(STATION, bundle, broker, workdir, workdir / "daemon.log", settings)

    @property
    def process(self) -> subprocess.Popen:
        return self._process

    def start(self) -> "DaemonProcess":
        earlier = self.log_path.read_text(errors="replace").count('"ready"') if self.log_path.exists() else 0
        super().start()
        self.wait_for_log('"ready"', READY_TIMEOUT_S, count=earlier + 1)
        return self

    def wait_for_log(self, text: str, timeout_s: float, count: int = 1) -> None:
        deadline = time.monotonic() + timeout_s
        while self.log_path.read_text(errors="replace").count(text) < count:
            assert self.process.poll() is None, self.log()
            assert time.monotonic() < deadline, f"{text!r} not logged within {timeout_s} s\n" + self.log()
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_tail(5000)

    def send(self, sig: int) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout_s: float = 60) -> int:
        return self.process.wait(timeout_s)

    def outbox_depth(self) -> int:
        return len(self.table("SELECT id FROM outbox"))

    def table(self, query: str) -> list[tuple]:
        with sqlite3.connect(f"file:{self.state_dir / 'outbox.sqlite3'}?mode=ro", uri=True) as db:
            return db.execute(query).fetchall()

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def results_by_frame(subscriber: Subscriber, count: int, timeout_s: float = 120) -> dict[str, Result]:
    messages = subscriber.wait_until(f"{PREFIX}/cam0/result",
                                     lambda ms: len({Result.model_validate_json(m.payload).frame_id for m in ms}) >= count,
                                     timeout_s)
    return {r.frame_id: r for r in (Result.model_validate_json(m.payload) for m in messages)}


def answers(subscriber: Subscriber) -> dict[str, list[Result | ErrorReport]]:
    """Every answer naming a frame, by frame id, de-duplicated on the station's answer ids."""
    seen, by_frame = set(), {}
    for message in subscriber.messages(f"{PREFIX}/cam0/result"):
        result = Result.model_validate_json(message.payload)
        if result.result_id not in seen:
            seen.add(result.result_id)
            by_frame.setdefault(result.frame_id, []).append(result)
    for message in subscriber.messages(f"{PREFIX}/error"):
        report = ErrorReport.model_validate_json(message.payload)
        if report.frame_id is not None and report.error_id not in seen:
            seen.add(report.error_id)
            by_frame.setdefault(report.frame_id, []).append(report)
    return by_frame


def wait_for_answers(subscriber: Subscriber, frame_ids: set[str], timeout_s: float = 120,
                     daemon: DaemonProcess | None = None) -> dict[str, list]:
    """Every answer once each of `frame_ids` has one; on timeout the AssertionError carries the
    daemon's log tail when `daemon` is given (a CI failure must say why)."""
    deadline = time.monotonic() + timeout_s
    while not frame_ids <= set(got := answers(subscriber)):
        if time.monotonic() >= deadline:
            missing = sorted(frame_ids - set(got))
            where = "" if daemon is None else f"\ndaemon exit code {daemon.process.poll()}; its log:\n{daemon.log()}"
            raise AssertionError(f"no answer for {len(missing)} frames {missing[:20]} within {timeout_s} s{where}")
        time.sleep(0.2)
    return got


def faulty_bundle(run: Path, reference: Path, out: Path, fault: Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                  tuple[torch.Tensor, torch.Tensor]], name: str) -> Path:
    """A norm-guided bundle of `run` (the manifest of the exported `reference`) whose graph passes
    the fused model's (images, maps, scores) through `fault`: a real torch.export program that verifies."""
    from trainer.evaluate import load_run
    from trainer.export.program import export_head

    cfg, model, _ = load_run(run)
    fused = model.fused(cfg.method).eval()

    class Faulty(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fused = fused

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return fault(images, *self.fused(images))

    manifest = Manifest.model_validate_json((reference / MANIFEST_NAME).read_text())
    out.mkdir(parents=True)
    program = export_head(Faulty(), model.image_size, manifest.input.max_batch)
    torch.export.save(program, out / "model.pt2")
    head = manifest.head("norm-guided").model_copy(update={"files": [BundleFile(
        path="model.pt2", format="torch.export", target="cpu", sha256=sha256_file(out / "model.pt2"))]})
    manifest = manifest.model_copy(update={"model": manifest.model.model_copy(update={"name": name}),
                                           "heads": [head], "recommended_head": "norm-guided"})
    (out / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n")
    (out / MANIFEST_DIGEST_NAME).write_text(sha256_file(out / MANIFEST_NAME) + "\n")
    return out

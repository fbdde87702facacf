"""`edge serve` as a subprocess on this machine, configured for a broker on 127.0.0.1, and the wait
for it to come online."""

import json
import queue
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from edge.watch import format_message
from harness import HarnessError
from harness.broker import Broker, free_port
from harness.feed import Feed
from protocols.messages import Status, status_topic

READY_TIMEOUT_S = 180.0  # the daemon loads, verifies and warms up the model first
STOP_TIMEOUT_S = 60.0    # SIGTERM drains: the daemon publishes what it accepted, then exits


class StationError(HarnessError):
    """The daemon exited, or did not come online."""


@dataclass(frozen=True)
class Memory:
    rss_mb: float   # VmRSS: resident now
    peak_mb: float  # VmHWM: the most it has ever had resident


class StationProcess:
    """`edge serve` with its own configuration (free ZeroMQ and metrics ports, no bundle watch,
    state in `workdir/state`), and `settings` over it: top-level keys and `{section: {key: value}}`.
    Its output is appended to `log_path`. Frames go to `endpoint`; it publishes under `prefix`."""

    def __init__(self, station_id: str, bundle: Path, broker: Broker, workdir: Path, log_path: Path,
                 settings: dict | None = None) -> None:
        self.prefix = f"inspection/{station_id}"  # the daemon's default topic prefix
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.metrics_port = free_port()  # metrics cannot be turned off from a file; clear of a real 9108
        self.state_dir = workdir / "state"
        self.log_path = log_path
        self._config = workdir / "edge.toml"
        defaults = {"bundle": str(bundle), "station_id": station_id, "state_dir": str(self.state_dir),
                    "metrics_port": self.metrics_port, "reload_watch": False, "zmq": {"bind": self.endpoint},
                    "mqtt": {"host": "127.0.0.1", "port": broker.port, "protocol": broker.protocol}}
        self._config.write_text(_toml(_merged(defaults, settings or {})))
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen([sys.executable, "-m", "edge", "serve", "--config", str(self._config)],
                                             stdout=log, stderr=log)

    @property
    def pid(self) -> int:
        return self._process.pid

    def check_running(self) -> None:
        if self._process.poll() is not None:
            raise StationError(f"edge serve exited with code {self._process.returncode}:\n{self.log_tail()}")

    def memory(self) -> Memory:
        """From /proc/PID/status (Linux), whose figures are in kB."""
        kb = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                kb[name] = int(value.split()[0])
        return Memory(rss_mb=kb["VmRSS"] / 1000, peak_mb=kb["VmHWM"] / 1000)

    def stop(self) -> None:
        """SIGTERM: the daemon publishes every verdict it owes, then exits; SIGKILL if it hangs."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def _merged(defaults: dict, overrides: dict) -> dict:
    merged = dict(defaults)
    for key, value in overrides.items():
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    return merged


def _toml(settings: dict) -> str:
    """Top-level keys, then one table per section. json.dumps writes strings, numbers, booleans and
    lists the way TOML wants them."""
    lines = [f"{key} = {json.dumps(value)}" for key, value in settings.items() if not isinstance(value, dict)]
    for section, values in settings.items():
        if isinstance(values, dict):
            lines += [f"[{section}]", *(f"{key} = {json.dumps(value)}" for key, value in values.items())]
    return "\n".join(lines) + "\n"


def wait_until_online(feed: Feed, station: StationProcess, show: bool = True) -> None:
    """Until the daemon's `online` status arrives (it comes only once the model is warmed up);
    `show` prints the messages that arrive meanwhile."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        station.check_running()
        try:
            message = feed.inbox.get(timeout=0.5)
        except queue.Empty:
            continue
        if show:
            print(format_message(station.prefix, message.topic, message.payload)[0], flush=True)
        if message.topic == status_topic(station.prefix) and _is_online(message.payload):
            return
    raise StationError(f"edge serve was not online within {READY_TIMEOUT_S:.0f} s:\n{station.log_tail()}")


def _is_online(payload: bytes) -> bool:
    try:
        return Status.model_validate_json(payload).state == "online"
    except ValidationError:
        return False

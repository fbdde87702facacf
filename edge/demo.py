"""`edge demo`: the whole station on one machine, end to end, in one command.

Starts an MQTT broker (the system's mosquitto, else amqtt embedded in this process), runs
`edge serve` as a subprocess, replays a labelled test folder (MVTec layout: test/good/*,
test/<defect>/*) over ZeroMQ, prints each verdict live next to its ground truth, then writes an
overlay picture per frame and a summary (accuracy, AUROC, throughput, latency) to --out.
Everything listens on 127.0.0.1 only, and every wait is bounded.
"""

import argparse
import asyncio
import base64
import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import zmq
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import ValidationError

from edge.frames import to_model_input
from edge.postprocess import upscale_map
from edge.replay import IMAGE_SUFFIXES, positive_float, positive_int, replay
from edge.runtime.bundle import BundleError
from edge.watch import GREEN, RED, RESET, format_message, format_result_line
from protocols.bundle import MANIFEST_NAME
from protocols.messages import Result, Status, error_topic, result_topic, status_topic

STATION_ID = "demo"
PREFIX = f"inspection/{STATION_ID}"
CAMERA_ID = "cam0"
GOOD_FOLDER = "good"  # MVTec layout: every other test folder holds one defect type

BROKER_START_TIMEOUT_S = 10.0
BROKER_STOP_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 180.0       # the daemon loads, verifies and warms up the model first
RESULT_IDLE_TIMEOUT_S = 60.0  # no new verdict for this long: the rest are not coming
STOP_TIMEOUT_S = 60.0         # SIGTERM drains: the daemon publishes what it accepted, then exits
CONTOUR_BGR = (0, 0, 255)
CAPTION_HEIGHT_PX = 28


class DemoError(Exception):
    """Something the demo cannot go on without; the message says what."""


# ---- brokers ---------------------------------------------------------------------------------

class Broker(Protocol):
    port: int
    protocol: str  # the MQTT version the daemon speaks to it: "5" or "3.1.1"
    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_mosquitto() -> str | None:
    """The mosquitto binary on PATH or in /usr/sbin (Debian's place, often not on a user's PATH)."""
    return shutil.which("mosquitto", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))


class MosquittoBroker:
    """The system's mosquitto on 127.0.0.1, no persistence, with a throw-away config."""
    protocol = "5"

    def __init__(self, binary: str, workdir: Path) -> None:
        self.port = _free_port()
        self.name = f"mosquitto on 127.0.0.1:{self.port}"
        self._binary = binary
        self._config = workdir / "mosquitto.conf"
        self._log_path = workdir / "mosquitto.log"
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        self._config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                                "log_dest stderr\n")
        with open(self._log_path, "wb") as log:
            self._process = subprocess.Popen([self._binary, "-c", str(self._config)], stdout=log, stderr=log)
        deadline = time.monotonic() + BROKER_START_TIMEOUT_S
        while not _listening(self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise DemoError(f"mosquitto did not start: {self._log_path.read_text(errors='replace')[-500:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(BROKER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(BROKER_STOP_TIMEOUT_S)
        self._process = None


class EmbeddedBroker:
    """amqtt's broker (MQTT 3.1.1) on its own asyncio loop in a background thread of this process."""
    protocol = "3.1.1"

    def __init__(self) -> None:
        self.port = _free_port()
        self.name = f"embedded amqtt on 127.0.0.1:{self.port}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker = None

    def start(self) -> None:
        try:
            from amqtt.broker import Broker as AmqttBroker  # the `demo` extra, needed only without mosquitto
        except ImportError:
            raise DemoError("no mosquitto and no embedded broker: pip install '.[demo]' (amqtt)") from None
        config = {"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
                  "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}}

        async def start_broker() -> AmqttBroker:
            broker = AmqttBroker(config)  # takes the running loop: create it there
            await broker.start()
            return broker

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mqtt-broker", daemon=True)
        self._thread.start()
        self._broker = asyncio.run_coroutine_threadsafe(start_broker(), self._loop).result(BROKER_START_TIMEOUT_S)

    def stop(self) -> None:
        if self._loop is None:
            return
        if self._broker is not None:
            asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(BROKER_STOP_TIMEOUT_S)
            self._broker = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(BROKER_STOP_TIMEOUT_S)
        self._loop.close()
        self._loop = None


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def choose_broker(choice: str, workdir: Path) -> Broker:
    """auto: mosquitto when installed, else the embedded one."""
    binary = find_mosquitto() if choice in ("auto", "mosquitto") else None
    if binary is not None:
        return MosquittoBroker(binary, workdir)
    if choice == "mosquitto":
        raise DemoError("mosquitto is not installed (apt-get install mosquitto); try --broker embedded")
    return EmbeddedBroker()


# ---- the station daemon ----------------------------------------------------------------------

class StationProcess:
    """`edge serve` as a subprocess with a demo configuration; its log goes to `log_path`."""

    def __init__(self, bundle: Path, broker: Broker, workdir: Path, log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        self.endpoint = f"tcp://127.0.0.1:{_free_port()}"
        self._config = workdir / "edge.toml"
        self._config.write_text(_station_config(bundle, workdir / "state", self.endpoint, _free_port(), broker))
        self.log_path = log_path
        self._env = {**os.environ, **(env or {})}  # EDGE_* variables override the config file
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen([sys.executable, "-m", "edge", "serve", "--config", str(self._config)],
                                             stdout=log, stderr=log, env=self._env)

    @property
    def pid(self) -> int:
        return self._process.pid

    def check_running(self) -> None:
        if self._process.poll() is not None:
            raise DemoError(f"edge serve exited with code {self._process.returncode}:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM: the daemon publishes every verdict it owes, then exits; SIGKILL if it hangs."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(STOP_TIMEOUT_S)

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def _station_config(bundle: Path, state_dir: Path, endpoint: str, metrics_port: int, broker: Broker) -> str:
    # json.dumps quotes and escapes strings the way TOML basic strings want them. Metrics cannot be
    # turned off from a file, so they get a free port, clear of a real station's 9108.
    return (f"bundle = {json.dumps(str(bundle))}\n"
            f'station_id = "{STATION_ID}"\n'
            f"state_dir = {json.dumps(str(state_dir))}\n"
            f"metrics_port = {metrics_port}\n"
            "reload_watch = false\n"
            f"[zmq]\nbind = {json.dumps(endpoint)}\n"
            f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\nprotocol = "{broker.protocol}"\n')


# ---- MQTT subscriber -------------------------------------------------------------------------

class Feed:
    """Subscribes to the station's results, status and errors; messages wait in `inbox`.
    MQTT 3.1.1, which both brokers speak."""

    def __init__(self, port: int) -> None:
        self.inbox: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self._client.on_connect = self._on_connect
        self._client.on_message = lambda client, userdata, message: self.inbox.put(message)
        self._port = port

    def start(self) -> None:
        self._client.connect("127.0.0.1", self._port)
        self._client.loop_start()

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata, flags, reason_code, properties) -> None:
        if not reason_code.is_failure:
            client.subscribe([(result_topic(PREFIX, "+"), 1), (status_topic(PREFIX), 1), (error_topic(PREFIX), 1)])


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
            print(format_message(PREFIX, message.topic, message.payload)[0], flush=True)
        if message.topic == status_topic(PREFIX) and _is_online(message.payload):
            return
    raise DemoError(f"edge serve was not online within {READY_TIMEOUT_S:.0f} s:\n{station.log_tail()}")


def _is_online(payload: bytes) -> bool:
    try:
        return Status.model_validate_json(payload).state == "online"
    except ValidationError:
        return False


# ---- the sample images -----------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    path: Path
    name: str    # relative to the images folder, e.g. colour/00.jpg
    truth: str   # its folder: `good` or the defect type

    @property
    def defective(self) -> bool:
        return self.truth != GOOD_FOLDER

    @property
    def overlay_name(self) -> str:
        """colour/00.jpg → colour_00.png: flat, as names repeat across folders."""
        return Path(self.name).with_suffix(".png").as_posix().replace("/", "_")


def list_samples(images: Path, limit: int | None) -> list[Sample]:
    """The images in the order edge.replay sends them (recursive, sorted by path): frame n is
    samples[n]."""
    paths = sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return [Sample(p, p.relative_to(images).as_posix(), p.parent.name) for p in paths[:limit]]


# ---- replay and live verdicts ----------------------------------------------------------------

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
                print(f"edge demo: no verdict for {RESULT_IDLE_TIMEOUT_S:.0f} s; giving up", file=sys.stderr)
                break
            continue
        line, is_result = format_message(PREFIX, message.topic, message.payload, color)
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
              f"truth {samples[index].truth:<8} {_mark(result, samples[index], color)}", flush=True)
    sender.join(timeout=1.0)
    if sender.error is not None:
        print(f"edge demo: replay failed: {sender.error}", file=sys.stderr)
    return Run(results, sender.sent, (last - started) if results else 0.0)


def _correct(result: Result, sample: Sample) -> bool:
    return (result.verdict == "fail") == sample.defective


def _mark(result: Result, sample: Sample, color: bool) -> str:
    correct = _correct(result, sample)
    mark = "✓" if correct else "✗"
    return f"{GREEN if correct else RED}{mark}{RESET}" if color else mark


# ---- overlay pictures ------------------------------------------------------------------------

def write_overlays(samples: list[Sample], results: dict[int, Result], bundle: Path, out: Path) -> None:
    """One PNG per verdict: [frame with the defect contours | heat map over the frame]. The
    result carries the mask but not the anomaly map, so the bundle runs here once more, on the
    same model input the daemon made."""
    from edge.runtime.loader import load_model  # torch: imported only when needed, `edge --help` stays quick

    model = load_model(bundle)
    spec = model.bundle.manifest.input
    indices = sorted(results)
    for start in range(0, len(indices), spec.max_batch):
        batch = indices[start:start + spec.max_batch]
        frames = [_read_bgr(samples[i].path) for i in batch]
        inputs = np.stack([to_model_input(cv2.cvtColor(f, cv2.COLOR_BGR2RGB), spec.height, spec.width)
                           for f in frames])
        maps, _ = model.infer(inputs)
        for index, frame, anomaly_map in zip(batch, frames, maps):
            picture = overlay_picture(frame, results[index], anomaly_map, samples[index])
            cv2.imwrite(str(out / samples[index].overlay_name), picture)


def _read_bgr(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DemoError(f"not a readable image: {path}")
    return image


def overlay_picture(frame: np.ndarray, result: Result, anomaly_map: np.ndarray, sample: Sample) -> np.ndarray:
    """A caption over two panels: the frame with the mask's contours, and the heat map blended
    over the frame."""
    height, width = frame.shape[:2]
    contoured = frame.copy()
    if result.mask is not None:
        contours, _ = cv2.findContours(_decode_mask(result.mask), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(contoured, contours, -1, CONTOUR_BGR, thickness=2)
    # The map is in [0, 1] on an absolute scale: a good part stays cool rather than being stretched.
    levels = (upscale_map(anomaly_map, height, width) * 255).clip(0, 255).astype(np.uint8)
    heat = cv2.addWeighted(frame, 0.5, cv2.applyColorMap(levels, cv2.COLORMAP_JET), 0.5, 0)
    caption = np.zeros((CAPTION_HEIGHT_PX, 2 * width, 3), np.uint8)
    text = (f"{sample.name}  {result.verdict.upper()}  score {result.score:.3f} / {result.threshold:.3f}  "
            f"truth {sample.truth}  {'correct' if _correct(result, sample) else 'WRONG'}")
    cv2.putText(caption, text, (8, CAPTION_HEIGHT_PX - 9), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1,
                cv2.LINE_AA)
    return np.vstack([caption, np.hstack([contoured, heat])])


def _decode_mask(encoded: str) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(base64.b64decode(encoded), np.uint8), cv2.IMREAD_GRAYSCALE)


# ---- summary ---------------------------------------------------------------------------------

def image_auroc(scores: np.ndarray, defective: np.ndarray) -> float | None:
    """Probability that a defective image scores above a good one (ties count half): the area
    under the ROC curve. None unless both kinds are present."""
    positives, negatives = scores[defective], scores[~defective]
    if not len(positives) or not len(negatives):
        return None
    above = positives[:, None] > negatives[None, :]
    tied = positives[:, None] == negatives[None, :]
    return float(above.mean() + 0.5 * tied.mean())


def summarise(samples: list[Sample], run: Run, broker: Broker, out: Path) -> dict:
    """What summary.json holds: the counts and figures of the table, and one entry per verdict."""
    pairs = [(samples[i], run.results[i]) for i in sorted(run.results)]
    results = [result for _, result in pairs]
    correct = [_correct(result, sample) for sample, result in pairs]
    latencies = [result.latency_ms.total for result in results]
    p50, p99 = (float(v) for v in np.percentile(latencies, [50, 99])) if results else (None, None)
    return {
        "frames": len(samples),
        "frames_sent": run.sent,
        "results": len(results),
        "pass": sum(result.verdict == "pass" for result in results),
        "fail": sum(result.verdict == "fail" for result in results),
        "correct": sum(correct),
        "accuracy": sum(correct) / len(results) if results else None,
        "image_auroc": image_auroc(np.array([result.score for result in results]),
                                   np.array([sample.defective for sample, _ in pairs], dtype=bool)),
        "throughput_fps": len(results) / run.seconds if run.seconds > 0 else None,
        "latency_ms": {"p50": p50, "p99": p99},
        "broker": broker.name,
        "model": results[0].model.model_dump() if results else None,
        "overlays": str(out),
        "per_frame": [{"image": sample.name, "truth": sample.truth, "frame_id": result.frame_id,
                       "verdict": result.verdict, "score": result.score, "threshold": result.threshold,
                       "latency_ms": result.latency_ms.total, "correct": ok, "overlay": sample.overlay_name}
                      for (sample, result), ok in zip(pairs, correct)],
    }


def print_summary(summary: dict, wall_s: float) -> None:
    def number(value: float | None, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    latency = summary["latency_ms"]
    rows = [
        ("frames sent / results", f"{summary['frames_sent'] if summary['frames_sent'] is not None else '?'}"
                                  f" / {summary['results']}  (of {summary['frames']})"),
        ("verdicts", f"pass {summary['pass']}  fail {summary['fail']}"),
        ("accuracy vs ground truth", f"{number(summary['accuracy'], '.1%')}  ({summary['correct']} right)"),
        ("image AUROC", number(summary["image_auroc"], ".3f")),
        ("throughput", f"{number(summary['throughput_fps'], '.2f')} frames/s"),
        ("latency total p50 / p99", f"{number(latency['p50'], '.1f')} / {number(latency['p99'], '.1f')} ms"),
        ("broker", summary["broker"]),
        ("pictures", f"{summary['overlays']}/  (one PNG per frame, summary.json, daemon.log)"),
        ("demo wall time", f"{wall_s:.1f} s"),
    ]
    print("\n── edge demo summary " + "─" * 50)
    for label, value in rows:
        print(f"  {label:<26} {value}")


# ---- the command -----------------------------------------------------------------------------

def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, required=True, help="model bundle directory")
    parser.add_argument("--images", type=Path, required=True,
                        help="labelled test folder: good/* and <defect>/* (MVTec layout)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the overlay pictures and summary.json")
    parser.add_argument("--fps", type=positive_float,
                        help="frames per second (default: as fast as the daemon takes them)")
    parser.add_argument("--limit", type=positive_int, metavar="N", help="only the first N images")
    parser.add_argument("--broker", choices=("auto", "mosquitto", "embedded"), default="auto",
                        help="auto (default): mosquitto when installed, else amqtt embedded in this process")


def run_demo(args: argparse.Namespace) -> int:
    """Exit code 0 when every frame got a verdict, 1 if not, 2 when the demo could not run,
    130 on Ctrl-C."""
    started = time.monotonic()
    try:
        samples = _check_inputs(args)
        args.out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="edge-demo-") as workdir:
            broker = choose_broker(args.broker, Path(workdir))
            run = _serve_and_replay(args, samples, broker, Path(workdir))
        # After the daemon has stopped: running the model here meanwhile would slow it down and
        # spoil the latency and throughput figures.
        print(f"writing overlay pictures to {args.out}/ ...", flush=True)
        write_overlays(samples, run.results, args.bundle, args.out)
    except (DemoError, BundleError) as err:
        print(f"edge demo: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edge demo: interrupted", file=sys.stderr)
        return 130
    summary = summarise(samples, run, broker, args.out)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary, time.monotonic() - started)
    return 0 if summary["results"] == summary["frames"] == summary["frames_sent"] else 1


def _check_inputs(args: argparse.Namespace) -> list[Sample]:
    if not (args.bundle / MANIFEST_NAME).is_file():
        raise DemoError(f"no model bundle at {args.bundle} (make demo-model builds one)")
    if not args.images.is_dir():
        raise DemoError(f"no such folder: {args.images}")
    samples = list_samples(args.images, args.limit)
    if not samples:
        raise DemoError(f"no images in {args.images}")
    return samples


def _serve_and_replay(args: argparse.Namespace, samples: list[Sample], broker: Broker, workdir: Path) -> Run:
    """Broker, subscriber and daemon up; replay; everything stopped again, in reverse order."""
    with contextlib.ExitStack() as running:
        print(f"starting {broker.name}", flush=True)
        broker.start()
        running.callback(broker.stop)
        feed = Feed(broker.port)
        feed.start()
        running.callback(feed.stop)
        station = StationProcess(args.bundle.resolve(), broker, workdir, (args.out / "daemon.log").resolve())
        print(f"starting edge serve (log: {station.log_path}); waiting for the model to load", flush=True)
        station.start()
        running.callback(station.stop)
        wait_until_online(feed, station)
        print(f"replaying {len(samples)} images from {args.images} to {station.endpoint}", flush=True)
        run = replay_and_collect(samples, args.images, station, feed, args.fps)
        print("stopping edge serve (SIGTERM: it drains) and the broker", flush=True)
    return run

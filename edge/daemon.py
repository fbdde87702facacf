"""`edge serve`: ZeroMQ frames in → fused inference → MQTT verdicts out, losing nothing.

Threads:
  main      signals, systemd READY/WATCHDOG/STOPPING, reload triggers, shutdown sequence
  receiver  ZeroMQ → validate/decode/resize → FrameQueue (rejections → error topic)
  inference FrameQueue → micro-batch → backend → hand-off (≤ PUBLISH_BACKLOG_BATCHES batches)
  publisher hand-off → verdict/regions/mask per frame → outbox (durable)
  mqtt      (paho + outbox sender, in MqttLink) outbox → broker, removed on acknowledgement
A frame counts as accepted once it is in the FrameQueue; its verdict is in the outbox (on disk)
before the frame is forgotten, and leaves the outbox only when the broker acknowledged it.
"""

import queue
import signal
import threading
import time
from dataclasses import dataclass

import cv2
import numpy as np
import structlog
import zmq
from pydantic import ValidationError

from edge.frame_queue import FrameQueue
from edge.frames import Frame, decode_message, to_model_input
from edge.metrics import DaemonMetrics
from edge.mqtt.link import MqttLink
from edge.mqtt.outbox import Outbox
from edge.postprocess import find_regions, mask_png_base64, upscale_map
from edge.runtime.bundle import BundleError
from edge.runtime.loader import LoadedModel, load_model_in_own_thread
from edge.settings import Settings
from edge.systemd import SystemdNotifier
from protocols.bundle import MANIFEST_DIGEST_NAME
from protocols.messages import (
    ErrorReport, FrameError, FrameHeader, LatencyMs, ModelRef, Result, Status,
)

POLL_MS = 100           # receiver wakes this often to notice shutdown
IDLE_TIMEOUT_S = 0.5    # inference loop heartbeat when no frames arrive
STALL_S = 30.0          # a thread silent this long means the pipeline is stuck: stop WATCHDOG=1
DRAIN_TIMEOUT_S = 30.0  # on SIGTERM, wait this long for the broker to take pending verdicts
PUBLISH_BACKLOG_BATCHES = 2  # inferred batches waiting for post-processing and the outbox


def _ms(start_ns: int, end_ns: int) -> float:
    return round((end_ns - start_ns) / 1e6, 3)


@dataclass
class QueuedFrame:
    frame: Frame
    queued_ns: int


@dataclass
class InferredBatch:
    """What the inference thread hands the publisher: the frames and the model's answer."""
    batch: list[QueuedFrame]
    maps: np.ndarray
    scores: np.ndarray
    model: LoadedModel
    start_ns: int
    inferred_ns: int


class Daemon:
    def __init__(self, settings: Settings, logger: structlog.stdlib.BoundLogger | None = None):
        self.settings = settings
        self.log = logger or structlog.get_logger("edge")
        # OpenCV's worker threads would compete with the inference thread's OpenMP workers for the
        # cores (0.89 → 0.91 of the bare backend's throughput, bench/daemon_vs_bare.py).
        cv2.setNumThreads(1)
        self.metrics = DaemonMetrics()
        self.notifier = SystemdNotifier()
        self.model: LoadedModel = load_model_in_own_thread(settings.bundle, settings.inference.backend)
        self._model_lock = threading.Lock()
        self.outbox = Outbox(settings.state_dir)
        self.metrics.outbox_depth.set_function(lambda: len(self.outbox))
        self.link = MqttLink(settings.mqtt, settings.topic_prefix, settings.station_id, self.outbox, self.log)
        self.queue: FrameQueue[QueuedFrame] = FrameQueue(settings.inference.queue_size,
                                                          settings.inference.backpressure)
        self.metrics.queue_depth.set_function(lambda: len(self.queue))
        # Post-processing and the durable write run on their own thread, so the backend goes on
        # to the next batch meanwhile; a small hand-off keeps memory bounded and the pressure on.
        self._inferred: queue.Queue[InferredBatch] = queue.Queue(maxsize=PUBLISH_BACKLOG_BATCHES)
        self._shutdown = threading.Event()        # stop taking new frames, then drain
        self._receiver_done = threading.Event()   # no more frames will enter the queue
        self._inference_done = threading.Event()  # no more batches will reach the publisher
        self._reload = threading.Event()
        self._beats = {name: time.monotonic() for name in ("receiver", "inference", "publisher")}
        self._threads = [threading.Thread(target=self._receive_loop, name="receiver", daemon=True),
                         threading.Thread(target=self._inference_loop, name="inference", daemon=True),
                         threading.Thread(target=self._publish_loop, name="publisher", daemon=True)]

    # ---- identity ----------------------------------------------------------------------------
    def model_ref(self, model: LoadedModel | None = None) -> ModelRef:
        model = model or self.model
        return ModelRef(name=model.bundle.manifest.model.name, version=model.bundle.manifest.model.version,
                        sha256=model.bundle.manifest_sha256)

    def status(self, state: str) -> Status:
        return Status(state=state, station_id=self.settings.station_id, model=self.model_ref(),
                      backend=self.model.backend.key, ts_ns=time.time_ns())

    # ---- control -----------------------------------------------------------------------------
    def request_shutdown(self) -> None:
        self._shutdown.set()

    def request_reload(self) -> None:
        self._reload.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.request_shutdown())
        signal.signal(signal.SIGINT, lambda *_: self.request_shutdown())
        signal.signal(signal.SIGHUP, lambda *_: self.request_reload())

    def run(self) -> int:
        """Serve until shutdown is requested; then drain. Returns the process exit code."""
        if self.settings.metrics_port:
            self.metrics.serve(self.settings.metrics_port)
        self.link.start(self.status("online"))
        for thread in self._threads:
            thread.start()
        self.notifier.ready(f"serving {self.model_ref().name} {self.model_ref().version} "
                            f"on {self.model.backend.key}")
        self.log.info("ready", model=self.model_ref().model_dump(), backend=self.model.backend.key,
                      images_per_second={size: round(rate, 2) for size, rate in self.model.batch_rates.items()},
                      batch=self.settings.inference.max_batch or self.model.best_batch, zmq=self.settings.zmq.bind,
                      mqtt=f"{self.settings.mqtt.host}:{self.settings.mqtt.port}", prefix=self.settings.topic_prefix)
        manifest_stamp = self._manifest_stamp()
        while not self._shutdown.wait(1.0 if self.notifier.watchdog_interval_s is None
                                      else min(1.0, self.notifier.watchdog_interval_s)):
            if self._pipeline_alive():
                self.notifier.watchdog()
            if self.settings.reload_watch and (stamp := self._manifest_stamp()) != manifest_stamp:
                manifest_stamp = stamp
                self._reload.set()
            if self._reload.is_set():
                self._reload.clear()
                self._swap_model()
        return self._drain()

    def _pipeline_alive(self) -> bool:
        now = time.monotonic()
        return all(now - beat < STALL_S for beat in self._beats.values()) and all(
            t.is_alive() for t in self._threads)

    def _manifest_stamp(self) -> float | None:
        try:
            return (self.settings.bundle / MANIFEST_DIGEST_NAME).stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def _swap_model(self) -> None:
        """Load, verify and warm up the new bundle beside the old one; swap only if it works."""
        self.log.info("reload_started", bundle=str(self.settings.bundle))
        try:
            new = load_model_in_own_thread(self.settings.bundle, self.settings.inference.backend)
        except BundleError as err:
            self.metrics.reloads.labels("refused").inc()
            self.log.error("reload_refused", reason=str(err), still_serving=self.model_ref().model_dump())
            self.link.publish_error(ErrorReport(reason=f"model reload refused: {err}", ts_ns=time.time_ns()))
            return
        with self._model_lock:
            old, self.model = self.model, new
        self.metrics.reloads.labels("swapped").inc()
        self.link.set_online(self.status("online"))
        self.log.info("reload_done", old=self.model_ref(old).model_dump(), new=self.model_ref(new).model_dump(),
                      backend=new.backend.key)

    def _drain(self) -> int:
        self.notifier.stopping()
        self.log.info("draining", queued=len(self.queue), outbox=len(self.outbox))
        for thread in self._threads:
            thread.join()
        delivered = self.link.wait_drained(DRAIN_TIMEOUT_S)
        self.link.stop(self.status("offline"))
        self.metrics.outbox_depth.set_function(lambda: 0)  # a scrape after close must not touch the database
        self.outbox.close()
        self.log.info("stopped", outbox_pending=0 if delivered else "kept on disk for the next start")
        return 0

    # ---- receiver ----------------------------------------------------------------------------
    def _open_socket(self, context: zmq.Context) -> zmq.Socket:
        cfg = self.settings.zmq
        if cfg.mode == "sub":
            sock = context.socket(zmq.SUB)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        else:
            sock = context.socket(zmq.PULL)
        sock.setsockopt(zmq.RCVHWM, cfg.rcvhwm)
        sock.setsockopt(zmq.LINGER, 0)
        if cfg.mode == "sub":
            for endpoint in cfg.connect:
                sock.connect(endpoint)
        else:
            sock.bind(cfg.bind)
        return sock

    def _receive_loop(self) -> None:
        context = zmq.Context.instance()
        sock = self._open_socket(context)
        try:
            while not self._shutdown.is_set():
                self._beats["receiver"] = time.monotonic()
                if sock.poll(POLL_MS):
                    self._accept(sock.recv_multipart(copy=False))
            # Frames ZeroMQ already holds were sent to us: take them before closing.
            for _ in range(self.settings.zmq.rcvhwm * 4):
                try:
                    self._accept(sock.recv_multipart(flags=zmq.NOBLOCK, copy=False))
                except zmq.Again:
                    break
        finally:
            sock.close()
            self._receiver_done.set()

    def _accept(self, parts: list[zmq.Frame]) -> None:
        received = time.monotonic_ns()
        self.metrics.frames_in.inc()
        try:
            header, rgb = decode_message([p.buffer for p in parts], self.settings.zmq.max_payload_bytes)
        except FrameError as err:
            self._reject(str(err), parts)
            return
        spec = self.model.bundle.manifest.input
        model_input = to_model_input(rgb, spec.height, spec.width)
        frame = Frame(header, rgb, received, _ms(received, time.monotonic_ns()), model_input)
        dropped = self.queue.put(QueuedFrame(frame, time.monotonic_ns()))
        if dropped is not None:
            self.metrics.frames_dropped.inc()
            self.link.publish_error(ErrorReport(
                reason="dropped: queue full under the `latest` backpressure policy",
                camera_id=dropped.frame.header.camera_id, frame_id=dropped.frame.header.frame_id,
                ts_ns=time.time_ns()))

    def _reject(self, reason: str, parts: list[zmq.Frame]) -> None:
        self.metrics.frames_rejected.inc()
        camera_id = frame_id = None
        try:  # name the frame if its header at least parses
            header = FrameHeader.model_validate_json(parts[0].bytes)
            camera_id, frame_id = header.camera_id, header.frame_id
        except (IndexError, ValidationError):
            pass
        self.log.warning("frame_rejected", reason=reason, camera_id=camera_id, frame_id=frame_id)
        self.link.publish_error(ErrorReport(reason=reason, camera_id=camera_id, frame_id=frame_id,
                                            ts_ns=time.time_ns()))

    # ---- inference ---------------------------------------------------------------------------
    def _inference_loop(self) -> None:
        cfg = self.settings.inference
        try:
            while True:
                self._beats["inference"] = time.monotonic()
                with self._model_lock:
                    model = self.model
                max_batch = min(cfg.max_batch or model.best_batch, model.bundle.manifest.input.max_batch)
                batch = self.queue.get_batch(max_batch, cfg.max_wait_ms / 1000, IDLE_TIMEOUT_S)
                if batch:
                    self._inferred.put(self._infer(batch, model))  # waits while the publisher is behind
                elif self._receiver_done.is_set() and not len(self.queue):
                    return
        finally:
            self._inference_done.set()

    def _infer(self, batch: list[QueuedFrame], model: LoadedModel) -> InferredBatch:
        spec = model.bundle.manifest.input
        start = time.monotonic_ns()
        inputs = np.stack([
            q.frame.model_input if q.frame.model_input.shape[:2] == (spec.height, spec.width)
            else to_model_input(q.frame.rgb, spec.height, spec.width)  # frame queued before a model swap
            for q in batch])
        maps, scores = model.infer(inputs)
        return InferredBatch(batch, maps, scores, model, start, time.monotonic_ns())

    # ---- publisher ---------------------------------------------------------------------------
    def _publish_loop(self) -> None:
        while True:
            self._beats["publisher"] = time.monotonic()
            try:
                inferred = self._inferred.get(timeout=IDLE_TIMEOUT_S)
            except queue.Empty:
                if self._inference_done.is_set() and self._inferred.empty():
                    return
                continue
            self._publish(inferred)

    def _publish(self, inferred: InferredBatch) -> None:
        cfg = self.settings.inference
        thresholds = inferred.model.bundle.manifest.thresholds
        image_threshold = thresholds.image if cfg.image_threshold is None else cfg.image_threshold
        pixel_threshold = thresholds.pixel if cfg.pixel_threshold is None else cfg.pixel_threshold
        ref = self.model_ref(inferred.model)
        for queued, anomaly_map, score in zip(inferred.batch, inferred.maps, inferred.scores):
            frame, header = queued.frame, queued.frame.header
            post_start = time.monotonic_ns()
            frame_map = upscale_map(anomaly_map, header.height, header.width)
            mask, regions = find_regions(frame_map, pixel_threshold, cfg.min_region_px)
            encoded_mask = mask_png_base64(mask) if self.settings.result.include_mask else None
            done = time.monotonic_ns()
            latency = LatencyMs(queue=_ms(queued.queued_ns, inferred.start_ns), decode=frame.decode_ms,
                                infer=_ms(inferred.start_ns, inferred.inferred_ns), post=_ms(post_start, done),
                                total=_ms(frame.received_ns, done))
            verdict = "fail" if score >= image_threshold else "pass"
            result = Result(camera_id=header.camera_id, frame_id=header.frame_id, part_id=header.part_id,
                            verdict=verdict, score=round(float(score), 6), threshold=image_threshold,
                            ts_capture_ns=header.ts_ns, ts_result_ns=time.time_ns(), latency_ms=latency,
                            model=ref, regions=regions, mask=encoded_mask, meta=header.meta)
            self.link.publish_result(result)  # durable in the outbox when this returns
            self.metrics.results.labels(verdict).inc()
            for stage, value in latency.model_dump().items():
                self.metrics.latency.labels(stage).observe(value / 1000)
            self.log.info("verdict", camera_id=header.camera_id, frame_id=header.frame_id, verdict=verdict,
                          score=result.score, regions=len(regions), latency_ms=latency.model_dump())

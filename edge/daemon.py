"""`edge serve`: ZeroMQ frames in → fused inference → MQTT verdicts out; every accepted frame answered.

Threads:
  main      signals, systemd READY/WATCHDOG/STOPPING, supervision, reloads, evictions, shutdown
  receiver  ZeroMQ → limits/decode/resize → journal → FrameQueue (rejections → error topic)
  inference FrameQueue → micro-batch → backend → hand-off (≤ PUBLISH_BACKLOG_BATCHES batches)
  publisher hand-off → verdict/regions/mask per frame → outbox (durable, one transaction a batch)
  mqtt      (paho + outbox sender, in MqttLink) outbox → broker, removed on acknowledgement
  model-load (while loading) a new bundle, verified and warmed up beside the one serving

The answer rule: a frame is accepted once it is decoded and written to the outbox's journal; from
then on it gets exactly one answer, a Result or an ErrorReport naming it, whatever fails:
  - a frame that cannot be used is rejected with a reason (never accepted);
  - a batch whose inference raises is retried frame by frame; frames that still fail get a
    `not_inspected` error; FAILING_BATCHES batches in a row without a usable output make the
    station `degraded` and reload the backend;
  - a non-finite score or map is a `fail` with a flag (never pass what was not inspected);
  - post-processing that fails for a frame gives that frame a `not_inspected` error;
  - a worker thread that dies anyway makes the station `faulted`: what it held is answered with
    errors, the rest drains, and the process exits 1 (systemd restarts it);
  - a SIGKILL or power cut: frames left in the journal are answered with errors at the next start.
"""

import signal
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from queue import Empty, Queue

import cv2
import numpy as np
import structlog
import zmq
from zmq.utils.monitor import recv_monitor_message

from edge.answer_ids import AnswerIds
from edge.camera_auth import HANDSHAKE_FAILED, CameraAuth, CameraAuthError
from edge.frame_queue import FrameQueue
from edge.frames import Frame, FrameIdGaps, decode_message, to_model_input
from edge.metrics import DaemonMetrics
from edge.mqtt.link import MqttLink
from edge.mqtt.outbox import Outbox
from edge.postprocess import fail_region_threshold, find_regions, mask_png_base64, upscale_map
from edge.runtime.loader import BackgroundLoad, LoadedModel
from edge.settings import Settings
from edge.systemd import SystemdNotifier
from protocols.bundle import MANIFEST_DIGEST_NAME, InputSpec
from protocols.signing import SIGNATURE_NAME
from protocols.messages import (
    ErrorReport, FrameError, FrameHeader, LatencyMs, ModelRef, Result, ResultFlag, Status, decode_header,
)

POLL_MS = 100              # receiver wakes this often to notice shutdown
IDLE_TIMEOUT_S = 0.5       # inference loop heartbeat when no frames arrive
STALL_S = 30.0             # a thread silent this long means the pipeline is stuck: stop WATCHDOG=1
DRAIN_TIMEOUT_S = 30.0     # on shutdown, wait this long for the threads, then for the broker
PUBLISH_BACKLOG_BATCHES = 2  # inferred batches waiting for post-processing and the outbox
FAILING_BATCHES = 3        # batches in a row without one usable output: the backend is failing
RELOAD_RETRY_S = 30.0      # while the backend fails, reload it at most this often
OUTBOX_RETRY_S = 1.0       # pause before writing answers again to an outbox that failed
EVICTION_REPORT_S = 60.0   # at most one error report this often about messages the quota discarded


class StartupError(Exception):
    """The station cannot start (e.g. its frame endpoint cannot be bound); the message says why."""


def _ms(start_ns: int, end_ns: int) -> float:
    return round((end_ns - start_ns) / 1e6, 3)


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"


@dataclass
class QueuedFrame:
    frame: Frame
    queued_ns: int


@dataclass
class Outcome:
    """The model's answer for one frame, or why there is none."""
    anomaly_map: np.ndarray | None
    score: float
    error: str | None = None
    flags: list[ResultFlag] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return self.error is None and not self.flags


@dataclass
class InferredBatch:
    """What the inference thread hands the publisher."""
    batch: list[QueuedFrame]
    outcomes: list[Outcome]
    model: LoadedModel
    start_ns: int
    inferred_ns: int


def _outcomes(maps: np.ndarray, scores: np.ndarray) -> list[Outcome]:
    outcomes = []
    for anomaly_map, score in zip(maps, scores):
        flags: list[ResultFlag] = []
        if not np.isfinite(score):
            flags.append("non_finite_score")
        if not np.isfinite(anomaly_map).all():
            flags.append("non_finite_map")
        outcomes.append(Outcome(anomaly_map, float(score), flags=flags))
    return outcomes


class Daemon:
    def __init__(self, settings: Settings, logger: structlog.stdlib.BoundLogger | None = None):
        self.settings = settings
        self.log = logger or structlog.get_logger("edge")
        # OpenCV's worker threads would compete with the inference thread's OpenMP workers for the
        # cores (0.89 → 0.91 of the bare backend's throughput, bench/daemon_vs_bare.py).
        cv2.setNumThreads(1)
        self.metrics = DaemonMetrics()
        self.notifier = SystemdNotifier()
        self.ids = AnswerIds()
        self.outbox = Outbox(settings.state_dir, settings.outbox.max_messages, settings.outbox.max_bytes)
        # Reads the MQTT password and TLS files: a bad one fails at once, before the ports and the model.
        self.link = MqttLink(settings.mqtt, settings.topic_prefix, settings.station_id, self.outbox, self.log)
        try:
            self._camera_auth = CameraAuth(settings.zmq, zmq.Context.instance(), self.log,
                                           self.metrics.camera_refusals)
        except CameraAuthError as err:
            raise StartupError(str(err)) from None
        # Ports are taken before the model loads: a busy one fails in a second, not after the warm-up.
        self._socket = self._open_socket()
        if settings.metrics_port:
            try:
                self.metrics.serve(settings.metrics_port)
            except OSError as err:
                self._socket.close()
                raise StartupError(f"cannot serve metrics on 127.0.0.1:{settings.metrics_port} "
                                   f"(metrics_port): {err}") from None
        self.model: LoadedModel = BackgroundLoad(settings.bundle, settings.inference.backend,
                                                 settings.trusted_keys_dir, settings.inference.head).result()
        self._model_lock = threading.Lock()
        self.metrics.outbox_depth.set_function(lambda: len(self.outbox))
        self.metrics.outbox_bytes.set_function(lambda: self.outbox.bytes)
        self.metrics.outbox_evicted.set_function(lambda: self.outbox.evicted_total)
        self.queue: FrameQueue[QueuedFrame] = FrameQueue(settings.inference.queue_size,
                                                          settings.inference.backpressure)
        self.metrics.queue_depth.set_function(lambda: len(self.queue))
        # Post-processing and the durable write run on their own thread, so the backend goes on
        # to the next batch meanwhile; a small hand-off keeps memory bounded and the pressure on.
        self._inferred: Queue[InferredBatch] = Queue(maxsize=PUBLISH_BACKLOG_BATCHES)
        self._shutdown = threading.Event()        # stop taking new frames, then drain
        self._receiver_done = threading.Event()   # no more frames will enter the queue
        self._inference_done = threading.Event()  # no more batches will reach the publisher
        self._give_up = threading.Event()         # drain deadline passed: stop retrying the outbox
        self._reload = threading.Event()
        self._loading: BackgroundLoad | None = None
        self._last_backend_reload = float("-inf")
        self._failing_batches = 0
        self._gaps = FrameIdGaps()
        self._evicted_unreported, self._last_eviction_report = 0, float("-inf")
        # State: online unless a condition (degraded) or a fault holds; published when it changes.
        self._state_lock = threading.RLock()  # held while publishing, so the last state published wins
        self._conditions: dict[str, str] = {}
        self._fault: str | None = None
        self._draining = False
        self._published: tuple | None = None
        self._beats = {name: time.monotonic() for name in ("receiver", "inference", "publisher")}
        # Frames a worker holds between its queues: answered for it if it dies.
        self._held: dict[str, list[QueuedFrame]] = {"inference": [], "publisher": []}
        self._threads = [self._supervised(name, loop) for name, loop in (
            ("receiver", self._receive_loop), ("inference", self._inference_loop), ("publisher", self._publish_loop))]

    # ---- identity and state ------------------------------------------------------------------
    def model_ref(self, model: LoadedModel | None = None) -> ModelRef:
        model = model or self.model
        return ModelRef(name=model.bundle.manifest.model.name, version=model.bundle.manifest.model.version,
                        sha256=model.bundle.manifest_sha256, head=model.head.name)

    def status(self) -> Status:
        with self._state_lock:
            state, reason = self._state()
        return Status(state=state, reason=reason, station_id=self.settings.station_id, model=self.model_ref(),
                      backend=self.model.backend.key, ts_ns=time.time_ns())

    def _state(self) -> tuple[str, str | None]:
        if self._fault is not None:
            return "faulted", self._fault
        if self._draining:
            return "draining", None
        if self._conditions:
            return "degraded", "; ".join(self._conditions.values())
        return "online", None

    def _set_condition(self, name: str, reason: str | None) -> None:
        """Something that degrades the station (reason) or no longer does (None)."""
        with self._state_lock:
            if reason is None:
                self._conditions.pop(name, None)
            else:
                self._conditions[name] = reason
        self._publish_state()

    def _publish_state(self) -> None:
        with self._state_lock:
            state, reason = self._state()
            key = (state, reason, self.model.bundle.manifest_sha256)
            if key == self._published:
                return
            self._published = key
            self.metrics.state.state(state)
            (self.log.info if state in ("online", "draining") else self.log.error)("state", state=state, reason=reason)
            self.link.set_status(self.status())

    # ---- control -----------------------------------------------------------------------------
    def request_shutdown(self) -> None:
        self._shutdown.set()

    def request_reload(self) -> None:
        self._reload.set()
        self._camera_auth.request_reload()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.request_shutdown())
        signal.signal(signal.SIGINT, lambda *_: self.request_shutdown())
        signal.signal(signal.SIGHUP, lambda *_: self.request_reload())

    def _supervised(self, name: str, loop) -> threading.Thread:
        """A worker thread whose death faults the station loudly instead of leaving it silent."""
        def run() -> None:
            try:
                loop()
            except BaseException as err:
                self.log.exception("thread_died", thread=name)
                with self._state_lock:
                    self._fault = self._fault or f"{name} thread died: {_describe(err)}"
                self._publish_state()
                self._shutdown.set()
        return threading.Thread(target=run, name=name, daemon=True)

    def run(self) -> int:
        """Serve until shutdown is requested or a thread dies; then drain. Returns the exit code."""
        self._answer_previous_run()
        self._published = ("online", None, self.model.bundle.manifest_sha256)
        self.metrics.state.state("online")
        self.link.start(self.status())
        for thread in self._threads:
            thread.start()
        self.notifier.ready(f"serving {self.model_ref().name} {self.model_ref().version} "
                            f"({self.model.head.name} head) on {self.model.backend.key}")
        self.log.info("ready", model=self.model_ref().model_dump(), backend=self.model.backend.key,
                      file=self.model.file.path, precision=self.model.file.precision,
                      passed_over=self.model.passed_over, signed_by=self.model.bundle.signer,
                      images_per_second={size: round(rate, 2) for size, rate in self.model.batch_rates.items()},
                      batch=self.settings.inference.max_batch or self.model.best_batch, zmq=self.settings.zmq.bind,
                      mqtt=f"{self.settings.mqtt.host}:{self.settings.mqtt.port}", prefix=self.settings.topic_prefix,
                      frame_memory_bound_mb=round(self.frame_memory_bound_bytes() / 2 ** 20),
                      thresholds=self.model.head.thresholds.model_dump(exclude_none=True))
        self._warn_if_thresholds_rest_on_few_images(self.model)
        # The loaded digest (a bundle replaced during the warm-up is seen) and the signature now.
        watched = (self.model.bundle.manifest_sha256, self._bundle_marker()[1])
        while not self._shutdown.wait(1.0 if self.notifier.watchdog_interval_s is None
                                      else min(1.0, self.notifier.watchdog_interval_s)):
            if not self.link.sender_alive:
                with self._state_lock:
                    self._fault = self._fault or "mqtt sender thread died"
                break
            if self._pipeline_alive():
                self.notifier.watchdog()
            if self.settings.reload_watch and (marker := self._bundle_marker())[0] is not None and marker != watched:
                watched = marker
                self._reload.set()
            self._step_reload()
            self._report_evictions()
        return self._drain()

    def _pipeline_alive(self) -> bool:
        now = time.monotonic()
        return all(now - beat < STALL_S for beat in self._beats.values()) and all(t.is_alive() for t in self._threads)

    def frame_memory_bound_bytes(self) -> int:
        """The most memory frames can hold, from the settings: ZeroMQ's buffer (per camera), one
        frame being decoded (encoded bytes, BGR, RGB, resize), the decoded queue, the hand-off to
        the publisher, and one frame's post-processing at frame resolution (map, mask, labels)."""
        zmq_cfg, inference = self.settings.zmq, self.settings.inference
        spec = self.model.bundle.manifest.input
        model_px = spec.height * spec.width
        return (zmq_cfg.rcvhwm * zmq_cfg.max_payload_bytes
                + zmq_cfg.max_payload_bytes + 2 * 3 * zmq_cfg.max_pixels
                + inference.queue_size * 3 * model_px
                + PUBLISH_BACKLOG_BATCHES * spec.max_batch * (3 + 4) * model_px
                + (4 + 1 + 4) * zmq_cfg.max_pixels)

    # ---- reloads -----------------------------------------------------------------------------
    def _bundle_marker(self) -> tuple[str | None, bytes | None]:
        """The manifest digest (None mid-deploy) and signature the bundle path shows now (through
        any symlink): a new signature alone also reloads, e.g. a bundle refused as unsigned, then signed."""
        def read(name: str) -> bytes | None:
            try:
                return (self.settings.bundle / name).read_bytes()
            except OSError:
                return None

        digest = read(MANIFEST_DIGEST_NAME)
        return (digest.decode("ascii", "replace").strip() or None) if digest else None, read(SIGNATURE_NAME)

    def _step_reload(self) -> None:
        """Start a requested reload, or finish one: loading runs on its own thread, so this
        thread keeps answering the watchdog meanwhile."""
        if self._loading is None:
            if self._reload.is_set():
                self._reload.clear()
                self.log.info("reload_started", bundle=str(self.settings.bundle))
                self._loading = BackgroundLoad(self.settings.bundle, self.settings.inference.backend,
                                               self.settings.trusted_keys_dir, self.settings.inference.head)
            return
        if not self._loading.done():
            return
        loading, self._loading = self._loading, None
        try:
            new = loading.result()
        except Exception as err:  # whatever went wrong, the old model keeps serving
            self.metrics.reloads.labels("refused").inc()
            self.log.error("reload_refused", reason=str(err), still_serving=self.model_ref().model_dump())
            self._publish_error("station", f"model reload refused: {err}", model=self.model_ref())
            return
        with self._model_lock:
            old, self.model = self.model, new
            self._failing_batches = 0
        self.metrics.reloads.labels("swapped").inc()
        self._set_condition("backend", None)  # a fresh backend; publishes the new model's identity too
        self.log.info("reload_done", old=self.model_ref(old).model_dump(), new=self.model_ref(new).model_dump(),
                      backend=new.backend.key, file=new.file.path, precision=new.file.precision,
                      passed_over=new.passed_over, signed_by=new.bundle.signer,
                      thresholds=new.head.thresholds.model_dump(exclude_none=True))
        self._warn_if_thresholds_rest_on_few_images(new)

    def _warn_if_thresholds_rest_on_few_images(self, model: LoadedModel) -> None:
        """The stated false-reject rate of a bundle calibrated on too few good images is a fit, not an
        observation (and may have been given up to keep catching defects); thresholds from the
        station's settings state none: say so where operators look."""
        thresholds, served = model.head.thresholds, self.settings.inference
        if served.image_threshold is not None or served.pixel_threshold is not None:
            # The bundle's stated rates belong to its own thresholds: none is stated for these.
            self.log.warning("thresholds_set_by_station_settings", image=served.image_threshold,
                             pixel=served.pixel_threshold, bundle_image=thresholds.image, bundle_pixel=thresholds.pixel,
                             advice="the bundle's stated false-reject rate does not apply to these thresholds")
        elif thresholds.estimator == "logit-normal":
            self.log.warning("thresholds_rest_on_few_images", calibration_images=thresholds.calibration_images,
                             target_false_reject_rate=thresholds.target_false_reject_rate,
                             expected_false_reject_rate=thresholds.expected_false_reject_rate,
                             limited_by=thresholds.limited_by,
                             advice="recalibrate on good line images: trainer calibrate BUNDLE GOOD_DIR --out NEW")

    # ---- shutdown ----------------------------------------------------------------------------
    def _drain(self) -> int:
        self.notifier.stopping()
        with self._state_lock:
            self._draining = True
        self._publish_state()
        self._shutdown.set()
        self.log.info("draining", queued=len(self.queue), outbox=len(self.outbox))
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        for thread in self._threads:
            while thread.is_alive() and time.monotonic() < deadline + 10:
                self._answer_stranded()
                thread.join(0.1)
                if time.monotonic() > deadline:
                    self._give_up.set()
            if thread.is_alive():
                self.log.error("thread_hung", thread=thread.name, queued=len(self.queue))
        self._answer_stranded()
        delivered = self.link.wait_drained(DRAIN_TIMEOUT_S)
        self.link.stop(Status(state="offline", station_id=self.settings.station_id, model=self.model_ref(),
                              backend=self.model.backend.key, ts_ns=time.time_ns()))
        self.outbox.close()
        self.log.info("stopped", fault=self._fault,
                      outbox_pending=0 if delivered else "kept on disk for the next start")
        return 0 if self._fault is None else 1

    def _answer_stranded(self) -> None:
        """Frames held for a worker thread that has died get a `not_inspected` error."""
        stranded: list[QueuedFrame] = []
        if not self._threads[1].is_alive():
            stranded += self._held["inference"] + self.queue.get_batch(self.settings.inference.queue_size, 0, 0)
            self._held["inference"] = []
        if not self._threads[2].is_alive():
            stranded += self._held["publisher"]
            self._held["publisher"] = []
            while True:
                try:
                    stranded += self._inferred.get_nowait().batch
                except Empty:
                    break
        if stranded:
            reason = f"not inspected: {self._fault or 'a station thread stopped'}"
            try:  # once: this runs on the main thread, which must go on draining
                self.link.publish_answers([self._not_inspected(q.frame, reason, None) for q in stranded],
                                          [q.frame.journal_id for q in stranded if q.frame.journal_id is not None])
            except sqlite3.Error as err:
                self.log.error("answers_lost", frames=len(stranded), reason=str(err))

    def _answer_previous_run(self) -> None:
        """Frames accepted before a crash or power cut, never answered: tell the line."""
        leftovers = self.outbox.unanswered()
        if not leftovers:
            return
        reports = [ErrorReport(error_id=self.ids.next(), kind="not_inspected", camera_id=row.camera_id,
                               frame_id=row.frame_id, part_id=row.part_id, ts_ns=time.time_ns(),
                               reason="not inspected: the station stopped (crash or power loss) before its verdict")
                   for row in leftovers]
        self.link.publish_answers(reports, [row.id for row in leftovers])
        self.metrics.errors.labels("not_inspected").inc(len(reports))
        self.log.warning("unanswered_from_previous_run", frames=len(reports))

    # ---- errors ------------------------------------------------------------------------------
    def _publish_error(self, kind: str, reason: str, header: FrameHeader | None = None,
                       model: ModelRef | None = None) -> None:
        report = ErrorReport(error_id=self.ids.next(), kind=kind, reason=reason, ts_ns=time.time_ns(), model=model,
                             camera_id=header and header.camera_id, frame_id=header and header.frame_id,
                             part_id=header and header.part_id)
        try:
            self.link.publish_error(report)
        except sqlite3.Error as err:
            self.log.error("error_report_lost", reason=reason, outbox_error=str(err))
            return
        self.metrics.errors.labels(kind).inc()

    def _not_inspected(self, frame: Frame, reason: str, model: ModelRef | None) -> ErrorReport:
        header = frame.header
        return ErrorReport(error_id=self.ids.next(), kind="not_inspected", reason=reason, camera_id=header.camera_id,
                           frame_id=header.frame_id, part_id=header.part_id, model=model, ts_ns=time.time_ns())

    def _report_evictions(self) -> None:
        self._evicted_unreported += self.outbox.take_evicted()
        now = time.monotonic()
        if self._evicted_unreported and now - self._last_eviction_report >= EVICTION_REPORT_S:
            count, self._evicted_unreported, self._last_eviction_report = self._evicted_unreported, 0, now
            self.log.error("outbox_full", discarded=count, max_messages=self.settings.outbox.max_messages,
                           max_bytes=self.settings.outbox.max_bytes)
            self._publish_error("station", f"outbox quota reached while the broker was away: the {count} oldest "
                                "undelivered messages were discarded (outbox.max_messages / outbox.max_bytes)")

    # ---- receiver ----------------------------------------------------------------------------
    def _open_socket(self) -> zmq.Socket:
        cfg = self.settings.zmq
        context = zmq.Context.instance()
        sock = context.socket(zmq.SUB if cfg.mode == "sub" else zmq.PULL)
        if cfg.mode == "sub":
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.setsockopt(zmq.RCVHWM, cfg.rcvhwm)
        # Checked by ZeroMQ per message part before it allocates one: the bytes bound of ingest.
        sock.setsockopt(zmq.MAXMSGSIZE, cfg.max_payload_bytes)
        sock.setsockopt(zmq.LINGER, 0)
        self._camera_auth.secure(sock)  # before bind/connect: no peer gets in unchecked
        endpoint = ", ".join(cfg.connect) if cfg.mode == "sub" else cfg.bind
        try:
            if cfg.mode == "sub":
                for address in cfg.connect:
                    sock.connect(address)
            else:
                sock.bind(cfg.bind)
        except zmq.ZMQError as err:
            sock.close()
            self._camera_auth.stop()
            raise StartupError(f"cannot {'connect to' if cfg.mode == 'sub' else 'bind'} {endpoint} "
                               f"(zmq.{'connect' if cfg.mode == 'sub' else 'bind'}): {err}") from None
        return sock

    def _receive_loop(self) -> None:
        sock = self._socket
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILED)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        try:
            while not self._shutdown.is_set():
                self._beats["receiver"] = time.monotonic()
                self._camera_auth.reload_if_requested()
                ready = dict(poller.poll(POLL_MS))
                # A refused handshake (counted there) is no camera's disconnect.
                if monitor in ready and not self._camera_auth.observe(recv_monitor_message(monitor)):
                    self.metrics.camera_disconnects.inc()
                    self.log.warning("camera_disconnected", note="the camera closed, or sent a message part over "
                                     "zmq.max_payload_bytes (ZeroMQ then resets the connection)")
                if sock in ready:
                    self._accept(sock.recv_multipart(copy=False))
            # Frames ZeroMQ already holds were sent to us: take them before closing.
            for _ in range(self.settings.zmq.rcvhwm * 4):
                try:
                    self._accept(sock.recv_multipart(flags=zmq.NOBLOCK, copy=False))
                except zmq.Again:
                    break
        finally:
            sock.disable_monitor()
            monitor.close()
            sock.close()
            # Only now: a CURVE socket without its ZAP handler would let any key in.
            self._camera_auth.stop()
            self._receiver_done.set()

    def _accept(self, parts: list[zmq.Frame]) -> None:
        received = time.monotonic_ns()
        self.metrics.frames_in.inc()
        buffers = [p.buffer for p in parts]
        with self._model_lock:
            spec = self.model.bundle.manifest.input
        try:
            header, rgb = decode_message(buffers, self.settings.zmq)
            model_input = to_model_input(rgb, spec.height, spec.width)
        except FrameError as err:
            self._reject(str(err), buffers)
            return
        except Exception as err:  # an OpenCV or decoder failure must not end the receiver
            self.log.exception("decode_failed")
            self._reject(f"frame could not be decoded: {_describe(err)}", buffers)
            return
        del rgb  # only the model-size input waits in the queue
        if self.settings.zmq.mode == "sub" and (missed := self._gaps.missed(header.camera_id, header.frame_id)):
            self.metrics.frames_missed.inc(missed)
            self.log.warning("frames_missed", camera_id=header.camera_id, before=header.frame_id, count=missed)
        frame = Frame(header, received, _ms(received, time.monotonic_ns()), model_input, self._journal(header))
        dropped = self.queue.put(QueuedFrame(frame, time.monotonic_ns()))
        if dropped is not None:
            self.metrics.frames_dropped.inc()
            self._write_answers([self._not_inspected(
                dropped.frame, "not inspected: dropped, queue full under the `latest` backpressure policy", None)],
                [dropped.frame.journal_id])

    def _journal(self, header: FrameHeader) -> int | None:
        """Record the frame as accepted (so even a crash gets it an answer at the next start)."""
        try:
            return self.outbox.journal_accepted(header.camera_id, header.frame_id, header.part_id)
        except sqlite3.Error as err:  # inspect anyway; only crash-safety of its answer is lost
            self.log.error("journal_failed", camera_id=header.camera_id, frame_id=header.frame_id, reason=str(err))
            return None

    def _reject(self, reason: str, parts: list[memoryview]) -> None:
        self.metrics.frames_rejected.inc()
        header = None
        if parts and len(parts[0]) <= self.settings.zmq.max_header_bytes:
            try:  # name the frame if its header at least parses
                header = decode_header(bytes(parts[0]))
            except FrameError:
                pass
        self.log.warning("frame_rejected", reason=reason, camera_id=header and header.camera_id,
                         frame_id=header and header.frame_id)
        self._publish_error("rejected", reason, header)

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
                    self._held["inference"] = batch
                    inferred = self._infer(batch, model)
                    self._track_health(inferred)
                    self._inferred.put(inferred)  # waits while the publisher is behind
                    self._held["inference"] = []
                elif self._receiver_done.is_set() and not len(self.queue):
                    return
        finally:
            self._inference_done.set()

    def _infer(self, batch: list[QueuedFrame], model: LoadedModel) -> InferredBatch:
        spec = model.bundle.manifest.input
        inputs = np.stack([self._model_input(q.frame, spec) for q in batch])
        start = time.monotonic_ns()
        try:
            outcomes = _outcomes(*model.infer(inputs))
        except Exception as err:
            self.metrics.failed_batches.inc()
            self.log.error("inference_failed", frames=len(batch), error=_describe(err))
            # One frame at a time: a frame the backend cannot take fails alone, not its batch-mates.
            outcomes = ([Outcome(None, float("nan"), error=_describe(err))] if len(batch) == 1
                        else [self._infer_one(inputs[i:i + 1], model) for i in range(len(batch))])
        return InferredBatch(batch, outcomes, model, start, time.monotonic_ns())

    def _infer_one(self, image: np.ndarray, model: LoadedModel) -> Outcome:
        try:
            return _outcomes(*model.infer(image))[0]
        except Exception as err:
            self.metrics.failed_batches.inc()
            return Outcome(None, float("nan"), error=_describe(err))

    @staticmethod
    def _model_input(frame: Frame, spec: InputSpec) -> np.ndarray:
        if frame.model_input.shape[:2] == (spec.height, spec.width):
            return frame.model_input
        return to_model_input(frame.model_input, spec.height, spec.width)  # queued before a swap to another size

    def _track_health(self, inferred: InferredBatch) -> None:
        """FAILING_BATCHES batches in a row without one usable output: degraded, reload the backend."""
        if any(o.usable for o in inferred.outcomes):
            self._failing_batches = 0
            self._set_condition("backend", None)
            return
        self._failing_batches += 1
        if self._failing_batches < FAILING_BATCHES:
            return
        problem = next((o.error for o in inferred.outcomes if o.error), None) or "non-finite outputs"
        self._set_condition("backend", f"{self._failing_batches} inference batches in a row failed ({problem})")
        if time.monotonic() - self._last_backend_reload >= RELOAD_RETRY_S:
            self._last_backend_reload = time.monotonic()
            self._reload.set()

    # ---- publisher ---------------------------------------------------------------------------
    def _publish_loop(self) -> None:
        while True:
            self._beats["publisher"] = time.monotonic()
            try:
                inferred = self._inferred.get(timeout=IDLE_TIMEOUT_S)
            except Empty:
                if self._inference_done.is_set() and self._inferred.empty():
                    return
                continue
            self._held["publisher"] = inferred.batch
            self._publish(inferred)

    def _publish(self, inferred: InferredBatch) -> None:
        ref = self.model_ref(inferred.model)
        answers: list[Result | ErrorReport] = []
        for queued, outcome in zip(inferred.batch, inferred.outcomes):
            if outcome.error is not None:
                answers.append(self._not_inspected(queued.frame, f"not inspected: inference failed: {outcome.error}",
                                                   ref))
                continue
            try:
                answers.append(self._result(queued, outcome, inferred, ref))
            except Exception as err:  # this frame still gets an answer, and the thread lives on
                self.log.exception("postprocess_failed", camera_id=queued.frame.header.camera_id,
                                   frame_id=queued.frame.header.frame_id)
                answers.append(self._not_inspected(queued.frame, f"not inspected: post-processing failed: "
                                                   f"{_describe(err)}", ref))
        self._write_answers(answers, [q.frame.journal_id for q in inferred.batch])
        self._held["publisher"] = []
        for answer in answers:
            if isinstance(answer, Result):
                self.metrics.results.labels(answer.verdict).inc()
                for stage, value in answer.latency_ms.model_dump().items():
                    self.metrics.latency.labels(stage).observe(value / 1000)
                self.log.info("verdict", camera_id=answer.camera_id, frame_id=answer.frame_id,
                              verdict=answer.verdict, score=answer.score, flags=answer.flags,
                              regions=len(answer.regions), latency_ms=answer.latency_ms.model_dump())
            else:
                self.metrics.errors.labels(answer.kind).inc()
                self.log.error("not_inspected", camera_id=answer.camera_id, frame_id=answer.frame_id,
                               reason=answer.reason)

    def _result(self, queued: QueuedFrame, outcome: Outcome, inferred: InferredBatch, ref: ModelRef) -> Result:
        cfg = self.settings.inference
        thresholds = inferred.model.head.thresholds
        image_threshold = thresholds.image if cfg.image_threshold is None else cfg.image_threshold
        pixel_threshold = thresholds.pixel if cfg.pixel_threshold is None else cfg.pixel_threshold
        frame, header = queued.frame, queued.frame.header
        post_start = time.monotonic_ns()
        verdict = "fail" if outcome.flags or outcome.score >= image_threshold else "pass"
        regions, encoded_mask = [], None
        if verdict == "fail" or self.settings.result.regions_on_pass:
            # Fail-safe: a pixel the model gave no finite value for counts as defective.
            anomaly_map = np.nan_to_num(outcome.anomaly_map, nan=1.0, posinf=1.0, neginf=1.0)
            frame_map = upscale_map(anomaly_map, header.height, header.width)
            region_threshold = pixel_threshold if verdict == "pass" else fail_region_threshold(
                pixel_threshold, image_threshold, frame_map, inferred.model.head.score_from_map)
            mask, regions = find_regions(frame_map, region_threshold, cfg.min_region_px)
            encoded_mask = mask_png_base64(mask) if self.settings.result.include_mask else None
        done = time.monotonic_ns()
        latency = LatencyMs(queue=_ms(queued.queued_ns, inferred.start_ns), decode=frame.decode_ms,
                            infer=_ms(inferred.start_ns, inferred.inferred_ns), post=_ms(post_start, done),
                            total=_ms(frame.received_ns, done))
        score = None if "non_finite_score" in outcome.flags else round(outcome.score, 6)
        return Result(result_id=self.ids.next(), camera_id=header.camera_id, frame_id=header.frame_id,
                      part_id=header.part_id, verdict=verdict, score=score, threshold=image_threshold,
                      flags=outcome.flags, ts_capture_ns=header.ts_ns, ts_result_ns=time.time_ns(),
                      latency_ms=latency, model=ref, regions=regions, mask=encoded_mask, meta=header.meta)

    def _write_answers(self, answers: list[Result | ErrorReport], journal_ids: list[int | None]) -> None:
        """Durable when this returns. An outbox that cannot be written (a full disk) is retried:
        the pipeline waits (backpressure reaches the cameras), the station says `degraded`."""
        settle = [i for i in journal_ids if i is not None]
        while True:
            try:
                self.link.publish_answers(answers, settle)
                break
            except sqlite3.Error as err:
                self._set_condition("outbox", f"outbox not writable: {err}")
                if self._give_up.is_set():
                    raise
                if (thread := threading.current_thread().name) in self._beats:
                    self._beats[thread] = time.monotonic()  # waiting on the disk, not stuck: keep the watchdog fed
                time.sleep(OUTBOX_RETRY_S)
        self._set_condition("outbox", None)

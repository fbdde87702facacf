"""Prometheus metrics of one daemon (its own registry, so several can live in one process)."""

from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, start_http_server

from protocols.messages import ErrorKind, StationState, Verdict

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class DaemonMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.frames_in = Counter("edge_frames_received", "Messages received from ZeroMQ", registry=r)
        self.frames_rejected = Counter("edge_frames_rejected", "Frames rejected (malformed, over a limit)", registry=r)
        self.frames_dropped = Counter("edge_frames_dropped", "Frames dropped by the `latest` policy", registry=r)
        self.frames_missed = Counter("edge_frames_missed", "Sub mode: frames that never arrived (gaps in numeric "
                                     "frame ids per camera; ZeroMQ drops at the high-water mark)", registry=r)
        self.camera_disconnects = Counter("edge_camera_disconnects", "Camera connections closed (by the camera, "
                                          "or by ZeroMQ for a message part over zmq.max_payload_bytes)", registry=r)
        self.camera_refusals = Counter("edge_camera_refusals", "Connections refused during ZeroMQ's handshake, "
                                       "before any message (reasons: edge/camera_auth.py)", ["reason"], registry=r)
        self.results = Counter("edge_results", "Verdicts handed to the outbox", ["verdict"], registry=r)
        for verdict in get_args(Verdict):  # at 0 from the start: a dashboard sees "no fails yet", not "no data"
            self.results.labels(verdict)
        self.errors = Counter("edge_errors", "Error reports handed to the outbox", ["kind"], registry=r)
        for kind in get_args(ErrorKind):
            self.errors.labels(kind)
        self.failed_batches = Counter("edge_inference_failures", "Inference calls that raised", registry=r)
        self.latency = Histogram("edge_latency_seconds", "Per-frame latency by stage", ["stage"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("edge_queue_depth", "Decoded frames waiting for inference", registry=r)
        self.outbox_depth = Gauge("edge_outbox_depth", "Messages not yet acknowledged by the broker", registry=r)
        self.outbox_bytes = Gauge("edge_outbox_bytes", "Payload bytes not yet acknowledged by the broker", registry=r)
        self.outbox_evicted = Gauge("edge_outbox_evicted", "Messages discarded by the outbox quota since start",
                                    registry=r)
        self.reloads = Counter("edge_model_reloads", "Model reload attempts", ["outcome"], registry=r)
        self.state = Enum("edge_state", "Station state (as on the status topic)", states=list(get_args(StationState)),
                          registry=r)

    def serve(self, port: int) -> None:
        start_http_server(port, addr="127.0.0.1", registry=self.registry)

"""Prometheus metrics of one daemon (its own registry, so several can live in one process)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class DaemonMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.frames_in = Counter("edge_frames_received", "Frames received from ZeroMQ", registry=r)
        self.frames_rejected = Counter("edge_frames_rejected", "Frames rejected (malformed)", registry=r)
        self.frames_dropped = Counter("edge_frames_dropped", "Frames dropped by the `latest` policy", registry=r)
        self.results = Counter("edge_results", "Verdicts handed to the outbox", ["verdict"], registry=r)
        self.latency = Histogram("edge_latency_seconds", "Per-frame latency by stage", ["stage"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("edge_queue_depth", "Decoded frames waiting for inference", registry=r)
        self.outbox_depth = Gauge("edge_outbox_depth", "Messages not yet acknowledged by the broker", registry=r)
        self.reloads = Counter("edge_model_reloads", "Model reload attempts", ["outcome"], registry=r)

    def serve(self, port: int) -> None:
        start_http_server(port, addr="127.0.0.1", registry=self.registry)

"""The server's Prometheus metrics (prometheus-client), in a registry of their own.

Names and what they count (seconds are device time where the pipeline reports them, i.e. real
seconds divided by the emulated cluster's dilation; HTTP latencies are wall seconds):

- `partita_requests_total{outcome}`: HTTP infer requests by outcome: `ok`, `bad_request` (400),
  `not_found` (404), `unauthorized` (400: a missing or wrong API key), `too_large` (400: a body over
  the limit), `failed` (accepted, then failed).
- `partita_requests_in_flight`: infer requests accepted (checked and queued) and not yet answered.
- `partita_request_latency_seconds`: histogram of infer requests answered `ok`, arrival to answer.
- `partita_batch_rows`, `partita_batch_requests`: histograms of each batch sent: rows, requests.
- `partita_batch_wait_seconds`: histogram of how long a batch's oldest request waited to be sent.
- `partita_stage_compute_seconds{stage,devices}`, `partita_stage_queue_seconds{stage,devices}`:
  measured mean compute and queue time per batch of each stage of the current plan;
  `partita_stage_predicted_compute_seconds{stage,devices}`: the plan's prediction.
- `partita_link_bytes_total{src,dst}`: bytes sent over each hop of the current plan (bytes per
  message times the batches delivered since the last poll, shared among a stage's replicas);
  `partita_link_transfer_seconds{src,dst}`: measured mean transfer per message.
- `partita_device_up{device}`: 1 while a device is up, 0 once it failed (until it joins again).
- `partita_switches_total{cause}`: re-plans switched to, by cause (`failure`, `join`, `drift`).
- `partita_plan_period_seconds{kind}`: the plan's predicted and the pipeline's measured period.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE", "ServeMetrics"]

OUTCOMES = ("ok", "bad_request", "not_found", "unauthorized", "too_large", "failed")


class ServeMetrics:
    """Every metric of one server; `render()` is the body of `GET /metrics`."""

    def __init__(self, max_rows: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("partita_requests", "HTTP infer requests by outcome", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)  # every outcome shows, at 0, from the start
        self.in_flight = Gauge("partita_requests_in_flight", "Infer requests accepted and not yet answered",
                               registry=r)
        self.latency = Histogram(
            "partita_request_latency_seconds", "Infer requests answered ok: arrival to answer (wall seconds)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        row_buckets = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, max_rows} & set(range(1, max_rows + 1)))
        self.batch_rows = Histogram("partita_batch_rows", "Rows per batch sent through the pipeline",
                                    buckets=row_buckets, registry=r)
        self.batch_requests = Histogram("partita_batch_requests", "Requests per batch",
                                        buckets=row_buckets, registry=r)
        self.batch_wait = Histogram("partita_batch_wait_seconds", "Wait of a batch's oldest request before it was sent",
                                    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25), registry=r)
        stage_labels = ["stage", "devices"]
        self.stage_compute = Gauge("partita_stage_compute_seconds", "Measured mean compute per batch (device s)",
                                   stage_labels, registry=r)
        self.stage_queue = Gauge("partita_stage_queue_seconds", "Measured mean queue time per batch (device s)",
                                 stage_labels, registry=r)
        self.stage_predicted = Gauge("partita_stage_predicted_compute_seconds", "The plan's compute per batch",
                                     stage_labels, registry=r)
        self.link_bytes = Counter("partita_link_bytes", "Bytes sent over each hop of the plan", ["src", "dst"],
                                  registry=r)
        self.link_transfer = Gauge("partita_link_transfer_seconds", "Measured mean transfer per message (device s)",
                                   ["src", "dst"], registry=r)
        self.device_up = Gauge("partita_device_up", "1 while the device is up, 0 after it failed", ["device"],
                               registry=r)
        self.switches = Counter("partita_switches", "Re-plans switched to, by cause", ["cause"], registry=r)
        self.period = Gauge("partita_plan_period_seconds", "Period of the plan: predicted and measured (device s)",
                            ["kind"], registry=r)

    def clear_plan(self) -> None:
        """Forget per-stage figures (the plan changed: its stages are new)."""
        for gauge in (self.stage_compute, self.stage_queue, self.stage_predicted):
            gauge.clear()

    def render(self) -> bytes:
        return generate_latest(self.registry)

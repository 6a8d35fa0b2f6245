"""Prometheus metrics, and /healthz and /readyz, on one small HTTP endpoint."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from math import nan
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from worker.config import DriftSection
    from worker.drift import DriftState

logger = logging.getLogger(__name__)


#: ``cxr_ood_score`` buckets as multiples of the model's ood_threshold.
OOD_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.5, 2.0, 4.0, 8.0)
#: ``cxr_heatmap_faithfulness`` buckets, in multiples of the model's faithfulness cut-off (a logit
#: drop whose scale differs by model: 2.5 on one phantom model, 16 on another); fine around 1,
#: where "above chance" begins.
FAITH_BUCKETS = (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.5, 2.0, 4.0, 8.0)


class Metrics:
    """Every metric the worker exports, in its own registry."""

    def __init__(self, ood_threshold: float | None = None, faithfulness_cutoff: float | None = None) -> None:
        r = self.registry = CollectorRegistry()
        self.received = Counter("cxr_instances_received", "Instances stored into the spool", registry=r)
        self.skipped = Counter("cxr_instances_skipped", "Instances acknowledged but not eligible", registry=r)
        self.processed = Counter("cxr_instances_processed", "Instances answered with SC and SR", registry=r)
        self.gated = Counter("cxr_instances_gated", "Instances outside the model's training distribution",
                             ["reason"], registry=r)
        self.failed = Counter("cxr_instances_failed", "Instances quarantined", registry=r)
        self.duplicates = Counter("cxr_instances_duplicate", "Instances already processed", registry=r)
        self.sent = Counter("cxr_objects_sent", "Result objects delivered", ["destination"], registry=r)
        self.send_failures = Counter("cxr_send_failures", "Failed delivery attempts", ["destination"], registry=r)
        self.dead_letters = Counter("cxr_dead_letters", "Result objects given up on", ["destination"], registry=r)
        self.refused = Counter("cxr_c_store_refused", "C-STORE answered with a failure status", ["status"],
                               registry=r)
        self.rejected = Counter("cxr_associations_rejected", "Associations refused", ["reason"], registry=r)
        self.aborted = Counter("cxr_associations_aborted", "Associations aborted for breaking a limit", registry=r)
        self.partial_removed = Counter("cxr_partial_receives_removed",
                                       "Data sets received in part, removed when their association ended",
                                       registry=r)
        self.internal_errors = Counter("cxr_internal_errors", "Bugs in the worker's code (logged with a traceback)",
                                       ["stage"], registry=r)
        self.infrastructure_errors = Counter("cxr_infrastructure_errors",
                                             "Runtime, disk or peer failures; the batch was requeued",
                                             ["stage"], registry=r)
        self.poisoned = Counter("cxr_instances_poisoned", "Instances quarantined after the worker died on them",
                                registry=r)
        self.store_errors = Counter("cxr_store_errors", "Results not recorded in the dashboard's database "
                                    "(the outputs went out regardless)", registry=r)
        self.destination_up = Gauge("cxr_destination_up", "1 when the destination answered its last check "
                                    "(C-ECHO, or QIDO-RS for DICOMweb)",
                                    ["destination"], registry=r)
        self.processing_paused = Gauge("cxr_processing_paused", "1 while processing backs off after an "
                                       "infrastructure fault", registry=r)
        self.queue_depth = Gauge("cxr_queue_depth", "Instances waiting for processing", registry=r)
        self.outbox_depth = Gauge("cxr_outbox_depth", "Result objects waiting to be sent", registry=r)
        self.stage_seconds = Histogram("cxr_stage_seconds", "Latency per pipeline stage", ["stage"], registry=r,
                                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.probability = Histogram("cxr_predicted_probability", "Calibrated probability of each image the model "
                                     "ran on", ["model_version"], registry=r,
                                     buckets=tuple(round(0.1 * i, 1) for i in range(1, 11)))
        # In multiples of the gate's threshold (one model per worker): the buckets then say how
        # far inside or outside the gate the images fall, whatever the score's own scale.
        scale = ood_threshold if ood_threshold is not None and ood_threshold > 0 else 1.0
        self.ood_score = Histogram("cxr_ood_score", "Out-of-distribution score of each image the model ran on "
                                   "(the gate holds an image above the model's ood_threshold)", ["model_version"],
                                   registry=r, buckets=tuple(scale * f for f in OOD_BUCKETS))
        faith_scale = faithfulness_cutoff if faithfulness_cutoff is not None and faithfulness_cutoff > 0 else 1.0
        self.faithfulness = Histogram("cxr_heatmap_faithfulness", "Heatmap faithfulness (logit drop) of each "
                                      "answered image it was computed for; above the model's faithfulness_cutoff "
                                      "is above chance", ["model_version"], registry=r,
                                      buckets=tuple(faith_scale * f for f in FAITH_BUCKETS))
        v = ["model_version"]
        self.drift_images = Gauge("cxr_drift_window_images", "Images in the drift window", v, registry=r)
        self.drift_gated = Gauge("cxr_drift_window_gated", "Images in the drift window the ood_score gate held out",
                                 v, registry=r)
        self.drift_gated_rate = Gauge("cxr_drift_gated_rate", "Fraction of the drift window the ood_score gate "
                                      "held out", v, registry=r)
        self.drift_false_gate_rate = Gauge("cxr_drift_false_gate_rate", "The gate's conformal false-gate rate "
                                           "(NaN: the model records none)", v, registry=r)
        self.drift_gated_p = Gauge("cxr_drift_gated_pvalue", "One-sided binomial p-value of the window's gated "
                                   "count at the false-gate rate (NaN: no gate rate or no images)", v, registry=r)
        self.drift_gated_alpha = Gauge("cxr_drift_gated_alpha", "drift.gated_alpha: the gated-rate alarm fires "
                                       "below this p-value", v, registry=r)
        self.drift_psi = Gauge("cxr_drift_psi", "Population stability index of the window's probabilities against "
                               "the validation split (NaN: no reference, or fewer than drift.min_images)", v,
                               registry=r)
        self.drift_psi_limit = Gauge("cxr_drift_psi_limit", "drift.psi_limit: the drift alarm fires above this PSI",
                                     v, registry=r)
        self.drift_reference = Gauge("cxr_drift_reference", "1 when the PSI has a reference, 0: none "
                                     "(exported before them) or from too few validation images", v, registry=r)
        self.model = Info("cxr_model", "The loaded model", registry=r)
        self.model_fallback = Gauge("cxr_model_probe_fallback", "1 when the configured model failed its load-time "
                                    "probe check and the fallback model answers instead", registry=r)

    def drift_limits(self, version: str, settings: DriftSection, has_reference: bool,
                     false_gate_rate: float | None) -> None:
        """Export the limits the alert rules compare with, and whether there is a reference."""
        self.drift_gated_alpha.labels(version).set(settings.gated_alpha)
        self.drift_psi_limit.labels(version).set(settings.psi_limit)
        self.drift_reference.labels(version).set(1 if has_reference else 0)
        self.drift_false_gate_rate.labels(version).set(nan if false_gate_rate is None else false_gate_rate)
        self.drift_psi.labels(version).set(nan)
        self.drift_gated_p.labels(version).set(nan)

    def drift(self, version: str, state: DriftState) -> None:
        self.drift_images.labels(version).set(state.images)
        self.drift_gated.labels(version).set(state.gated)
        self.drift_gated_rate.labels(version).set(state.gated_rate)
        self.drift_gated_p.labels(version).set(nan if state.gated_p_value is None else state.gated_p_value)
        self.drift_psi.labels(version).set(nan if state.psi is None else state.psi)

    def exposition(self) -> bytes:
        return bytes(generate_latest(self.registry))


class HealthServer:
    """``/metrics``, ``/healthz`` (alive), ``/readyz`` (ready to take studies) and ``/drift``
    (the drift window's history, for the dashboard's operations page)."""

    def __init__(self, metrics: Metrics, bind: str, port: int,
                 alive: Callable[[], bool], ready: Callable[[], dict[str, bool]],
                 detail: Callable[[], dict[str, Any]] = dict, drift: Callable[[], dict[str, Any]] | None = None
                 ) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            # Each connection holds a thread: one that sends nothing is closed after this long.
            timeout = 5.0

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path == "/metrics":
                    outer.metrics_update()
                    self._send(200, metrics.exposition(), CONTENT_TYPE_LATEST)
                elif self.path == "/healthz":
                    ok = alive()  # detail (e.g. the destinations) informs; only liveness sets the code
                    body = json.dumps({"alive": ok, **detail()}).encode()
                    self._send(200 if ok else 503, body, "application/json")
                elif self.path == "/readyz":
                    checks = ready()
                    ok = all(checks.values())
                    body = json.dumps({"ready": ok, "checks": checks}).encode()
                    self._send(200 if ok else 503, body, "application/json")
                elif self.path == "/drift" and drift is not None:
                    self._send(200, json.dumps(drift()).encode(), "application/json")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return  # scrapes every few seconds would flood the log

        self.metrics_update: Callable[[], None] = lambda: None
        self.server = ThreadingHTTPServer((bind, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="health", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> None:
        self.thread.start()
        logger.info("metrics and health endpoint", extra={"port": self.port})

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

"""The operations page's numbers and plots: from the results database and the worker's /metrics.

Plots are matplotlib SVG, rendered on the server: nothing to load from elsewhere, and an
administrator reads them at a glance. Text in them comes from the database (model
versions), so they are served as images, never inlined into the page.
"""

from __future__ import annotations

import io
import json
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from worker.store import ResultStore, StoredResult

#: Colours of the dashboard's CSS, so plots and page agree.
INK, MUTED, ACCENT, WARN = "#1f2933", "#7b8794", "#2f6fde", "#d9822b"


@dataclass
class Snapshot:
    """Everything the operations page shows, computed once per request."""

    answered_24h: int = 0
    answered_7d: int = 0
    per_hour: list[int] = field(default_factory=list)  # the last 24 hours, oldest first
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    gated_rate_7d: float | None = None
    record_ms_p50: float | None = None
    worker: dict[str, float] = field(default_factory=dict)  # from /metrics; empty when unreachable
    worker_error: str = ""
    weekly: dict[str, list[float]] = field(default_factory=dict)  # ISO week -> probabilities
    disagreement: dict[str, tuple[int, int]] = field(default_factory=dict)  # model version -> (disagree, total)
    #: The worker's drift window (its /drift): limits, "reference", and the history of states.
    drift: dict[str, Any] = field(default_factory=dict)

    @property
    def drift_now(self) -> dict[str, Any]:
        """The window's latest state; empty before the first image or without the worker."""
        history = self.drift.get("history") or []
        return history[-1] if history else {}


WORKER_METRICS = {
    "cxr_queue_depth": "Queue depth",
    "cxr_outbox_depth": "Outbox depth",
    "cxr_dead_letters_total": "Dead letters",
    "cxr_instances_failed_total": "Quarantined",
    "cxr_store_errors_total": "Store errors",
}


def scrape(url: str, timeout: float = 2.0) -> dict[str, float]:
    """Sum each metric of interest over its labels from a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (an operator's URL)
        text = response.read().decode("utf-8", "replace")
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in WORKER_METRICS:
                out[sample.name] = out.get(sample.name, 0.0) + float(sample.value)
    return out


def drift_url(metrics_url: str) -> str:
    """The worker's ``/drift`` beside its ``/metrics`` (same host and port)."""
    base, _, last = metrics_url.rstrip("/").rpartition("/")
    return f"{base}/drift" if last == "metrics" else metrics_url.rstrip("/") + "/drift"


def fetch_drift(url: str, timeout: float = 2.0) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (an operator's URL)
        data = json.loads(response.read().decode("utf-8", "replace"))
    return data if isinstance(data, dict) else {}


def snapshot(store: ResultStore, metrics_url: str | None, now: datetime | None = None) -> Snapshot:
    now = now or datetime.now(UTC)
    snap = Snapshot()
    results = store.results_since(now - timedelta(weeks=12))
    day = [r for r in results if r.answered_at >= now - timedelta(hours=24)]
    week = [r for r in results if r.answered_at >= now - timedelta(days=7)]
    snap.answered_24h, snap.answered_7d = len(day), len(week)
    snap.per_hour = [0] * 24
    for r in day:
        # A result can be answered "after" now: another worker host's clock runs ahead on a shared
        # PostgreSQL, or the row committed between `now` and the query. It counts in the last hour.
        hours_ago = max(0, int((now - r.answered_at).total_seconds() // 3600))
        snap.per_hour[23 - min(23, hours_ago)] += 1
    latencies = [r.latency_s for r in day if r.latency_s is not None]
    if latencies:
        snap.latency_p50_s, snap.latency_p95_s = (float(v) for v in np.percentile(latencies, [50, 95]))
    if week:
        snap.gated_rate_7d = sum(r.ood for r in week) / len(week)
    snap.weekly = _weekly(results)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for version, agree in store.current_feedback_since(now - timedelta(weeks=12)):
        counts[version][0] += 0 if agree else 1
        counts[version][1] += 1
    snap.disagreement = {v: (c[0], c[1]) for v, c in sorted(counts.items())}
    if metrics_url:
        try:
            snap.worker = scrape(metrics_url)
        except Exception as exc:  # the worker may be down: the page says so instead of failing
            snap.worker_error = f"worker metrics unavailable ({type(exc).__name__})"
        else:
            try:
                snap.drift = fetch_drift(drift_url(metrics_url))
            except Exception:  # a worker from before /drift, or a proxy that only passes /metrics
                snap.drift = {}
    return snap


def _weekly(results: list[StoredResult]) -> dict[str, list[float]]:
    weeks: dict[str, list[float]] = defaultdict(list)
    for r in results:
        if r.decision != "withheld":
            year, week, _ = r.answered_at.isocalendar()
            weeks[f"{year}-W{week:02d}"].append(r.probability)
    return dict(sorted(weeks.items()))


def _figure(width: float = 5.0, height: float = 2.6) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=96)
    ax = fig.add_subplot()
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color(MUTED)
    ax.tick_params(colors=INK, labelsize=8)
    return fig, ax


def _svg(fig: Any) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})
    return buffer.getvalue()


def plot_throughput(snap: Snapshot) -> bytes:
    fig, ax = _figure()
    hours = np.arange(-23, 1)
    ax.bar(hours, snap.per_hour, color=ACCENT, width=0.8)
    ax.set_xlabel("hours ago", fontsize=8, color=MUTED)
    ax.set_ylabel("results / hour", fontsize=8, color=MUTED)
    ax.set_xticks([-23, -18, -12, -6, 0], ["-23", "-18", "-12", "-6", "now"])
    return _svg(fig)


def plot_drift(snap: Snapshot) -> bytes:
    fig, ax = _figure()
    if snap.weekly:
        labels = list(snap.weekly)
        ax.boxplot([snap.weekly[k] for k in labels], tick_labels=labels, widths=0.5, patch_artist=True,
                   boxprops={"facecolor": "#dbe7fb", "edgecolor": ACCENT}, medianprops={"color": INK},
                   whiskerprops={"color": MUTED}, capprops={"color": MUTED},
                   flierprops={"markeredgecolor": MUTED, "markersize": 3})
        ax.set_ylim(0, 1)
        ax.tick_params(axis="x", labelrotation=30)
    else:
        ax.text(0.5, 0.5, "no results yet", ha="center", va="center", color=MUTED, transform=ax.transAxes)
    ax.set_ylabel("probability", fontsize=8, color=MUTED)
    return _svg(fig)


def plot_disagreement(snap: Snapshot) -> bytes:
    fig, ax = _figure()
    if snap.disagreement:
        versions = [v.replace("$", r"\$") for v in snap.disagreement]  # a "$" is not math text here
        rates = [d / t if t else 0.0 for d, t in snap.disagreement.values()]
        bars = ax.bar(versions, rates, color=WARN, width=0.4)
        ax.set_xlim(-0.8, len(versions) - 0.2)  # one version stays a bar, not a wall
        for bar, (d, t) in zip(bars, snap.disagreement.values(), strict=True):
            ax.annotate(f"{d}/{t}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=8, color=INK, xytext=(0, 2), textcoords="offset points")
        ax.set_ylim(0, 1.1)
    else:
        ax.text(0.5, 0.5, "no reader feedback yet", ha="center", va="center", color=MUTED, transform=ax.transAxes)
    ax.set_ylabel("disagreement rate", fontsize=8, color=MUTED)
    ax.set_xlabel("model version", fontsize=8, color=MUTED)
    return _svg(fig)


def _drift_series(snap: Snapshot, key: str) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], list[bool]]:
    """Minutes ago, the value of ``key`` (NaN where None) and the alarm flag of each history point."""
    history = snap.drift.get("history") or []
    now = history[-1]["time"] if history else 0.0
    minutes = np.array([(h["time"] - now) / 60.0 for h in history], np.float64)
    values = np.array([np.nan if h.get(key) is None else float(h[key]) for h in history], np.float64)
    alarm = [bool(h.get("gated_alarm" if key == "gated_p_value" else "psi_alarm")) for h in history]
    return minutes, values, alarm


def _no_drift(ax: Any, snap: Snapshot, why: str) -> None:
    text = "worker not reachable" if not snap.drift else why
    ax.text(0.5, 0.5, text, ha="center", va="center", color=MUTED, transform=ax.transAxes)


def plot_psi(snap: Snapshot) -> bytes:
    """The population stability index of the window over time, with its alarm limit."""
    fig, ax = _figure()
    minutes, values, alarm = _drift_series(snap, "psi")
    if snap.drift and not snap.drift.get("has_reference"):
        _no_drift(ax, snap, str(snap.drift.get("reference", "no reference")))
    elif not np.isfinite(values).any():
        _no_drift(ax, snap, f"collecting: PSI from {snap.drift.get('min_images', '?')} images in the window")
    else:
        limit = float(snap.drift["psi_limit"])
        ax.plot(minutes, values, color=ACCENT, lw=1.2)
        ax.scatter(minutes[alarm], values[alarm], color=WARN, s=8, zorder=3)
        ax.axhline(limit, color=WARN, lw=0.8, ls="--")
        ax.set_ylim(0, max(limit * 1.5, float(np.nanmax(values)) * 1.1))
        ax.set_xlabel("minutes ago", fontsize=8, color=MUTED)
    ax.set_ylabel("PSI of probabilities", fontsize=8, color=MUTED)
    return _svg(fig)


def plot_gated(snap: Snapshot) -> bytes:
    """The gated-rate test over time: -log10 of its p-value against -log10 alpha."""
    fig, ax = _figure()
    minutes, values, alarm = _drift_series(snap, "gated_p_value")
    if snap.drift.get("false_gate_rate") is None:
        _no_drift(ax, snap, "no gate rate: the model records no conformal false-gate rate")
    elif not np.isfinite(values).any():
        _no_drift(ax, snap, "no images yet")
    else:
        strength = -np.log10(np.clip(values, 1e-300, 1.0))
        limit = -np.log10(float(snap.drift["gated_alpha"]))
        ax.plot(minutes, strength, color=ACCENT, lw=1.2)
        ax.scatter(minutes[alarm], strength[alarm], color=WARN, s=8, zorder=3)
        ax.axhline(limit, color=WARN, lw=0.8, ls="--")
        ax.set_ylim(0, max(limit * 1.5, float(np.nanmax(strength)) * 1.1))
        ax.set_xlabel("minutes ago", fontsize=8, color=MUTED)
    ax.set_ylabel("-log10 p, gated rate", fontsize=8, color=MUTED)
    return _svg(fig)


PLOTS = {"throughput": plot_throughput, "drift": plot_drift, "disagreement": plot_disagreement,
         "psi": plot_psi, "gated": plot_gated}

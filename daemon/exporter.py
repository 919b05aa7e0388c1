"""Prometheus metrics at ``http://HOST:PORT/metrics`` (``[metrics]``, off by default).

Nothing is counted twice: each scrape reads the supervisor's snapshots (its
``status()`` and ``counts()``, the sink's last ``stats`` with its histograms, the
job store, the DICOM node's counters, the newest result of each model: see
daemon/result_metrics.py) and turns them into metric families, so the figures are the
ones ``echod ctl status`` shows. Names and labels follow the
Prometheus conventions (base units: seconds, bytes, ratios; counters end in
``_total``); ``promtool check metrics`` accepts the page. The HTTP server is
prometheus-client's, in its own thread, bound to localhost unless configured.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from daemon import __version__, result_metrics
from daemon.config import MetricsConfig
from daemon.errors import ConfigError

log = logging.getLogger(__name__)

JOB_BOUNDS_S = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
SOURCE_STATES = ("connecting", "connected", "disconnected", "streaming")
DROP_CAUSES = ("infer", "torn", "poisoned", "rejected")  # Supervisor.counts()


class Exporter:
    """Serves the metrics of ``supervisor`` until :meth:`close`."""

    def __init__(self, settings: MetricsConfig, supervisor: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SupervisorCollector(supervisor))
        ProcessCollector(namespace="echod", registry=self.registry)  # the supervisor process
        try:
            self.server, self._thread = start_http_server(
                settings.port, settings.host, registry=self.registry
            )
        except OSError as e:
            raise ConfigError(
                f"metrics port {settings.host}:{settings.port} cannot be used ({e.strerror}): "
                "set metrics.host and metrics.port to a free one"
            ) from None
        self.port = int(self.server.server_port)
        log.info("metrics on http://%s:%d/metrics", settings.host, self.port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class SupervisorCollector(Collector):
    def __init__(self, supervisor: Any) -> None:
        self.sup = supervisor

    def collect(self) -> Iterator[Metric]:
        st = self.sup.status()
        yield from _daemon(st)
        yield from _frames(st, self._sink_stats())
        yield from _stages(st)
        yield from _source(st)
        yield from result_metrics.collect(result_metrics.sources(self.sup.rings, self.sup.workers))
        if self.sup.jobs is not None:
            yield from _jobs(st["jobs"] or {}, self.sup.jobs.store().durations())
        if getattr(self.sup, "dicom", None) is not None:
            yield from _dicom(self.sup.dicom.metrics())
        yield from _resources(st.get("resources") or {})

    def _sink_stats(self) -> dict[str, Any]:
        sink = self.sup.workers.get("sink")
        return dict(sink.stats) if sink is not None else {}


def _daemon(st: dict[str, Any]) -> Iterator[Metric]:
    yield InfoMetricFamily(
        "echod_build",
        "echod's version and its Python",
        value={"version": __version__, "python": platform.python_version()},
    )
    yield GaugeMetricFamily(
        "echod_start_time_seconds",
        "when the daemon started (Unix time)",
        value=time.time() - st["uptime_s"],
    )


def _frames(st: dict[str, Any], sink: dict[str, Any]) -> Iterator[Metric]:
    yield CounterMetricFamily("echod_frames_in", "frames acquired", value=st["frames_in"])
    yield CounterMetricFamily(
        "echod_frames_out", "frames that reached the sink", value=st["frames_out"]
    )
    yield _labelled(
        CounterMetricFamily(
            "echod_frames_dropped",
            "frames that got no label map, by cause (infer: skipped for a newer one; torn, "
            "poisoned, rejected)",
            labels=["cause"],
        ),
        {**dict.fromkeys(DROP_CAUSES, 0), **st["dropped"]},
    )
    yield _labelled(
        CounterMetricFamily(
            "echod_frames_skipped",
            "label maps a consumer reading the newest did not take",
            labels=["consumer"],
        ),
        st["skipped"],
    )
    withheld = (st.get("withheld") or {}).get("frames")
    if withheld is not None:
        yield CounterMetricFamily(
            "echod_overlays_withheld", "label maps whose overlay the guard withheld", value=withheld
        )
    if st.get("fps") is not None:
        yield GaugeMetricFamily(
            "echod_frames_per_second", "frames per second at the sink", value=st["fps"]
        )
    hist = sink.get("histograms") or {}
    if "latency_ms" in hist:
        family = HistogramMetricFamily(
            "echod_frame_latency_seconds", "acquisition to sink, per frame", labels=[]
        )
        family.add_metric([], *_buckets(hist["latency_ms"]))
        yield family
    if hist.get("steps_ms"):
        family = HistogramMetricFamily(
            "echod_step_duration_seconds",
            "the paper's Table 2 per frame: nn_input, nn_inference, nn_output",
            labels=["step"],
        )
        for step, h in hist["steps_ms"].items():
            family.add_metric([step], *_buckets(h))
        yield family


def _buckets(h: dict[str, Any]) -> tuple[list[tuple[str, float]], float]:
    """A sink histogram (ms, cumulative counts with +Inf last) in seconds."""
    bounds = [floatToGoString(b / 1000.0) for b in h["bounds"]] + ["+Inf"]
    return list(zip(bounds, h["counts"], strict=True)), h["sum"] / 1000.0


def _stages(st: dict[str, Any]) -> Iterator[Metric]:
    restarts = CounterMetricFamily(
        "echod_stage_restarts", "restarts of each stage", labels=["stage"]
    )
    up = GaugeMetricFamily(
        "echod_stage_up", "1 while the stage runs and is ready", labels=["stage"]
    )
    for name, stage in st["stages"].items():
        restarts.add_metric([name], stage["restarts"])
        up.add_metric([name], float(stage["state"] == "running"))
    yield restarts
    yield up
    if st.get("engine"):
        yield InfoMetricFamily(
            "echod_model",
            "the live model and where it runs",
            value={k: str(st.get(k) or "") for k in ("engine", "device", "model")},
        )


def _source(st: dict[str, Any]) -> Iterator[Metric]:
    source = st.get("source") or {}
    state = source.get("state")
    if state in SOURCE_STATES:
        yield StateSetMetricFamily(
            "echod_source_state",
            "the live source's connection state",
            value={s: s == state for s in SOURCE_STATES},
        )
        yield CounterMetricFamily(
            "echod_source_reconnects",
            "reconnections to the scanner",
            value=source.get("reconnects", 0),
        )


def _jobs(counts: dict[str, int], durations: Iterable[tuple[str, str, float]]) -> Iterator[Metric]:
    family = GaugeMetricFamily(
        "echod_jobs", "offline jobs by state (queued: the queue's depth)", labels=["state"]
    )
    for state in ("queued", "running", "done", "failed", "cancelled"):
        family.add_metric([state], counts.get(state, 0))
    yield family
    grouped: dict[tuple[str, str], list[float]] = {}
    for kind, outcome, seconds in durations:
        grouped.setdefault((kind, outcome), []).append(seconds)
    hist = HistogramMetricFamily(
        "echod_job_duration_seconds",
        "offline jobs that ran, start to end, by kind and outcome",
        labels=["kind", "outcome"],
    )
    for (kind, outcome), values in sorted(grouped.items()):
        counts_le = [sum(v <= b for v in values) for b in JOB_BOUNDS_S] + [len(values)]
        bounds = [floatToGoString(b) for b in JOB_BOUNDS_S] + ["+Inf"]
        hist.add_metric([kind, outcome], list(zip(bounds, counts_le, strict=True)), sum(values))
    yield hist


def _dicom(m: dict[str, Any]) -> Iterator[Metric]:
    assoc = CounterMetricFamily(
        "echod_dicom_associations",
        "DICOM associations: as SCP (accepted, rejected, aborted), as SCU (established, failed)",
        labels=["role", "outcome"],
    )
    for outcome in ("accepted", "rejected", "aborted"):
        assoc.add_metric(["scp", outcome], m["scp"].get(outcome, 0))
    scu = {"established": 0, "failed": 0}
    sends = CounterMetricFamily(
        "echod_dicom_sends",
        "result files sent by C-STORE, by destination and outcome (retry: a failed try)",
        labels=["destination", "outcome"],
    )
    for (dest, outcome), n in sorted(m["sends"].items()):
        if outcome.startswith("association"):
            scu["failed" if outcome.endswith("failed") else "established"] += n
        else:
            sends.add_metric([dest, outcome], n)
    for outcome, n in scu.items():
        assoc.add_metric(["scu", outcome], n)
    yield assoc
    yield sends
    yield GaugeMetricFamily(
        "echod_dicom_associations_active", "DICOM associations open now", value=m["active"]
    )
    yield CounterMetricFamily(
        "echod_dicom_instances_received",
        "DICOM instances stored",
        value=m["scp"].get("instances", 0),
    )
    yield GaugeMetricFamily(
        "echod_dicom_series_in_progress",
        "series receiving, or waiting for their job",
        value=m["series_in_progress"],
    )
    yield GaugeMetricFamily(
        "echod_dicom_sends_pending", "result files waiting to be sent", value=m["sends_pending"]
    )
    yield GaugeMetricFamily(
        "echod_dicom_storage_bytes", "received series on disk", value=m["storage_bytes"]
    )


def _resources(r: dict[str, Any]) -> Iterator[Metric]:
    if not r:
        return  # refreshed with the telemetry of the control socket
    yield GaugeMetricFamily(
        "echod_system_cpu_usage_ratio", "the machine's CPU use (0..1)", value=r["cpu_percent"] / 100
    )
    yield GaugeMetricFamily(
        "echod_system_memory_usage_ratio",
        "the machine's memory in use (0..1)",
        value=r["memory_percent"] / 100,
    )
    for minutes, value in zip((1, 5, 15), r["load"], strict=True):
        yield GaugeMetricFamily(
            f"echod_system_load{minutes}", f"load average over {minutes} minute(s)", value=value
        )
    yield GaugeMetricFamily(
        "echod_resident_memory_bytes",
        "resident memory of the supervisor and its stages together",
        value=r["rss_mb"] * 2**20,
    )
    temps = r.get("temperatures_c") or {}
    if temps:
        family = GaugeMetricFamily(
            "echod_temperature_celsius", "temperatures the platform reports", labels=["sensor"]
        )
        for sensor, value in temps.items():
            family.add_metric([sensor], value)
        yield family


def _labelled(family: CounterMetricFamily, values: dict[str, Any]) -> CounterMetricFamily:
    for label, value in values.items():
        family.add_metric([label], value)
    return family

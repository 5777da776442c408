"""``/metrics``: the broker's telemetry (``BrokerCore.metrics``) in Prometheus' text format, by
prometheus-client. The names are the ones issue 13 promised and deploy/ scrapes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric


class _Snapshot:
    """A collector over one answer of the broker's loop (a registry is made per request: nothing is kept)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def collect(self) -> Iterator[Metric]:
        d = self.data
        yield CounterMetricFamily("zpar_tasks_submitted", "Tasks the broker accepted from producers.",
                                  value=d["submitted"])
        yield _by(CounterMetricFamily("zpar_tasks_finished", "Tasks that ended, by how.", labels=["outcome"]),
                  d["finished"])
        yield GaugeMetricFamily("zpar_tasks_queued", "Tasks waiting at the broker for a worker.", value=d["queued"])
        yield GaugeMetricFamily("zpar_tasks_running", "Tasks given to agents and not finished.", value=d["running"])
        yield _by(GaugeMetricFamily("zpar_workers", "Worker processes of the connected agents.", labels=["state"]),
                  d["workers"])
        yield GaugeMetricFamily("zpar_nodes", "Agents connected.", value=d["nodes"])
        yield GaugeMetricFamily("zpar_producers", "Producers (clients) connected.", value=d["producers"])
        durations = d["durations"]
        yield HistogramMetricFamily(
            "zpar_task_duration_seconds", "Run time of the tasks that returned or raised, as their worker measured.",
            buckets=[("+Inf" if le is None else repr(float(le)), count) for le, count in durations["buckets"]],
            sum_value=durations["sum"])
        yield CounterMetricFamily("zpar_handshakes_refused", "Connections refused at the CurveZMQ handshake "
                                  "(no secret, a wrong one, a key not allowed).", value=d["handshakes_refused"])
        yield CounterMetricFamily("zpar_protocol_errors", "Messages dropped as malformed or not allowed.",
                                  value=d["protocol_errors"])
        yield GaugeMetricFamily("zpar_broker_loop_lag_seconds", "How late the broker's loop ran its last "
                                "heartbeat timer: time it spent busy with messages.", value=d["loop_lag"])
        yield GaugeMetricFamily("zpar_broker_uptime_seconds", "Seconds since the broker started.", value=d["uptime"])


def _by(family: CounterMetricFamily | GaugeMetricFamily, counts: dict[str, float]) -> Metric:
    """``family`` with one sample per ``counts`` entry, labelled by its key."""
    for label, count in counts.items():
        family.add_metric([label], count)
    return family


def render(data: dict[str, Any]) -> tuple[bytes, str]:
    """``(body, content type)`` of /metrics for one answer of the broker's loop."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(data))
    return generate_latest(registry), CONTENT_TYPE_LATEST

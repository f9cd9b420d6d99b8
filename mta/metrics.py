"""Every Prometheus metric mta exports, declared once (prometheus-client).

Metrics are the only module-level state in mta (ARCHITECTURE.md, habit 4).
They live in their own registry so the admin API exports exactly these plus
the process collector. Gauges that describe the queue are filled by a
collector the daemon registers at start-up (`register_queue_collector`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)

SMTP_SESSIONS = Counter("mta_smtp_sessions", "SMTP sessions accepted", ["port"], registry=REGISTRY)
SMTP_COMMANDS = Counter("mta_smtp_commands", "SMTP commands received", ["port", "command"], registry=REGISTRY)
TLS_HANDSHAKES = Counter("mta_tls_handshakes", "TLS handshakes on the SMTP listeners", ["result"], registry=REGISTRY)
AUTH_ATTEMPTS = Counter("mta_auth_attempts", "SMTP AUTH attempts", ["result"], registry=REGISTRY)
AUTH_LOCKOUTS = Counter("mta_auth_lockouts", "IPs or users locked out after AUTH failures", registry=REGISTRY)
MESSAGES_RECEIVED = Counter("mta_messages_received", "Messages accepted into the queue", ["port"], registry=REGISTRY)
MESSAGES_REJECTED = Counter("mta_messages_rejected", "Commands or messages refused, by reason", ["reason"], registry=REGISTRY)
DELIVERY_ATTEMPTS = Counter("mta_delivery_attempts", "Delivery attempts per recipient, by result", ["result"], registry=REGISTRY)
DELIVERY_DURATION = Histogram("mta_delivery_duration_seconds", "Time from arrival to final delivery",
                              buckets=(0.1, 0.5, 1, 5, 30, 60, 300, 1800, 3600, 14400, 86400, 604800),
                              registry=REGISTRY)
DSNS_SENT = Counter("mta_dsns_sent", "Delivery status notifications generated", ["action"], registry=REGISTRY)


def inc(metric: Counter, *label_values: str) -> None:
    """`metric.labels(*label_values).inc()` for the per-command hot path:
    labels() validates and takes a lock on every call, so the child is
    looked up once and kept (label values here come from fixed sets)."""
    key = (metric, label_values)
    child = _CHILDREN.get(key)
    if child is None:
        child = _CHILDREN.setdefault(key, metric.labels(*label_values))
    child.inc()


_CHILDREN: dict = {}


QUEUE_STATUSES = ("active", "deferred", "hold", "bounce")


class QueueCollector:
    """The queue gauges, computed at scrape time from a (cached) queue scan.

    `source()` returns an object with `by_status` (status -> messages),
    `by_domain` (recipient domain -> messages, already bounded), `bytes` and
    `oldest_age_seconds()`: `mta.admin.service.QueueSnapshot.get`. Every
    status series is always present, 0 when empty (INTERFACE.md).
    """

    def __init__(self, source):
        self.source = source

    def _families(self):
        return (
            GaugeMetricFamily("mta_queue_messages", "Messages in the queue, by status", labels=["status"]),
            GaugeMetricFamily("mta_queue_messages_by_domain",
                              "Queued messages with open recipients at each destination domain "
                              "(top domains, the rest as domain=\"other\")", labels=["domain"]),
            GaugeMetricFamily("mta_queue_oldest_age_seconds", "Age of the oldest queued message"),
            GaugeMetricFamily("mta_queue_bytes", "Bytes of queued messages"),
        )

    def describe(self):
        return self._families()

    def collect(self):
        shape = self.source()
        by_status, by_domain, oldest, size = self._families()
        for status in QUEUE_STATUSES:
            by_status.add_metric([status], shape.by_status.get(status, 0))
        for domain, count in sorted(shape.by_domain.items()):
            by_domain.add_metric([domain], count)
        oldest.add_metric([], shape.oldest_age_seconds())
        size.add_metric([], shape.bytes)
        return (by_status, by_domain, oldest, size)


_queue_collector = None


def register_queue_collector(collector) -> None:
    """Register the queue collector; a later call replaces the earlier one."""
    global _queue_collector
    if _queue_collector is not None:
        REGISTRY.unregister(_queue_collector)
    REGISTRY.register(collector)
    _queue_collector = collector

"""Every Prometheus metric mta exports, declared once (prometheus-client).

Metrics are the only module-level state in mta (ARCHITECTURE.md, habit 4).
They live in their own registry so the admin API exports exactly these plus
the process collector. Gauges that describe the queue are filled by a
collector the daemon registers at start-up (`register_queue_collector`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector

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


def register_queue_collector(collector) -> None:
    REGISTRY.register(collector)

"""Unit tests of the admin API's pieces that need no running daemon (issue 5).

- The OpenAPI document and the Falcon router list the same routes and
  methods (walks the compiled router's nodes).
- The service layer's pure parts: queue filtering, header unfolding (RFC
  5322 2.2.3), the qshape-like aggregation with its bounded domain labels.
- Health with a dead listener thread (503), which is hard to cause from
  outside a real daemon.
- The metrics collector: every status series present at 0 when empty.

The HTTP behaviour itself is tested end to end in tests/e2e/test_admin_api.py.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from mta.admin import openapi, service
from mta.admin.app import create_app
from mta.admin.deps import AdminDeps

HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD")


def _walk(nodes):
    for node in nodes:
        if node.resource is not None:
            yield node
        yield from _walk(node.children)


def router_routes(app) -> set[tuple[str, str]]:
    """(template, METHOD) for every responder a resource really implements."""
    routes = set()
    for node in _walk(app._router._roots):
        for method, responder in node.method_map.items():
            if method in HTTP_METHODS and getattr(responder, "__self__", None) is node.resource:
                routes.add((node.uri_template, method))
    return routes


def document_routes() -> set[tuple[str, str]]:
    return {(path, method.upper()) for path, item in openapi.DOCUMENT["paths"].items() for method in item}


def fake_deps(**changes) -> AdminDeps:
    config = SimpleNamespace(admin_protect_metrics=False, delivery_workers=0, greylist_enabled=False)
    values = dict(spool=None, users=None, policy=None, config=lambda: config, token="t")
    values.update(changes)
    return AdminDeps(**values)


def test_openapi_matches_router():
    """Every route+method in the router is documented, and nothing else is."""
    app_routes = router_routes(create_app(fake_deps()))
    documented = document_routes()
    assert len(app_routes) > 30, app_routes
    assert app_routes - documented == set(), "routes missing from openapi.py"
    assert documented - app_routes == set(), "documented routes the app does not serve"


def test_openapi_document_is_consistent():
    """Every $ref resolves and every path parameter is declared."""
    doc = openapi.DOCUMENT
    assert doc["openapi"].startswith("3.0")

    def refs(value):
        if isinstance(value, dict):
            for key, item in value.items():
                if key == "$ref":
                    yield item
                else:
                    yield from refs(item)
        elif isinstance(value, list):
            for item in value:
                yield from refs(item)

    for ref in refs(doc):
        _, _, section, name = ref.split("/")
        assert name in doc["components"][section], ref
    for path, item in doc["paths"].items():
        names = {part[1:-1] for part in path.split("/") if part.startswith("{")}
        for method, operation in item.items():
            declared = {p["name"] for p in operation.get("parameters", ()) if p["in"] == "path"}
            assert declared == names, (path, method)
            assert "responses" in operation and operation["summary"]


SUMMARIES = [
    {"id": "A", "status": "active", "size": 10, "arrival": "2026-01-01T00:00:02+00:00", "sender": "Alice@Example.org",
     "recipients": [{"address": "bob@remote.example", "status": "pending", "attempts": 0, "last_error": None}]},
    {"id": "B", "status": "deferred", "size": 20, "arrival": "2026-01-01T00:00:01+00:00", "sender": "",
     "recipients": [{"address": "carol@other.example", "status": "deferred", "attempts": 2, "last_error": "451"},
                    {"address": "dave@remote.example", "status": "delivered", "attempts": 1, "last_error": None}]},
    {"id": "C", "status": "hold", "size": 30, "arrival": "2026-01-01T00:00:03+00:00", "sender": "eve@example.org",
     "recipients": [{"address": "bob@remote.example", "status": "pending", "attempts": 0, "last_error": None}]},
]


@pytest.mark.parametrize("kwargs, ids", [
    ({}, ["A", "B", "C"]),
    ({"status": "hold"}, ["C"]),
    ({"sender": "alice@example.org"}, ["A"]),          # case-insensitive
    ({"sender": "@example.org"}, ["A", "C"]),          # a whole domain
    ({"sender": "<>"}, ["B"]),                          # the null sender
    ({"recipient": "dave@remote.example"}, ["B"]),     # any recipient, delivered ones too
    ({"recipient": "@remote.example", "status": "active"}, ["A"]),
])
def test_filter_messages(kwargs, ids):
    assert [m["id"] for m in service.filter_messages(SUMMARIES, **kwargs)] == ids


@pytest.mark.parametrize("kwargs", [{"status": "queued"}, {"sender": " "}, {"recipient": "<>"}])
def test_filter_messages_rejects_bad_values(kwargs):
    with pytest.raises(service.Invalid):
        service.filter_messages(SUMMARIES, **kwargs)


def test_page():
    assert service.page(range(5), limit=2, offset=1) == {"items": [1, 2], "total": 5}
    assert service.page([], limit=10, offset=3) == {"items": [], "total": 0}


def test_header_unfolding():
    """RFC 5322 2.2.3: unfolding removes the CRLF before continuation whitespace."""
    raw = (b"Received: from a\r\n\tby b;\r\n date\r\nSubject: =?utf-8?q?x?=\r\nX-Bin: caf\xc3\xa9 \xff\r\n"
           b"not a header line\r\nTo:  <bob@remote.example>\r\n")
    assert service.parse_header_section(raw) == [
        ["Received", "from a\tby b; date"],
        ["Subject", "=?utf-8?q?x?="],
        ["X-Bin", "caf\u00e9 \ufffd"],
        ["To", "<bob@remote.example>"],
    ]


def test_shape_counts_and_bounds_domains():
    shape = service.shape_of(SUMMARIES)
    assert shape.by_status == {"active": 1, "deferred": 1, "hold": 1, "bounce": 0}
    assert shape.bytes == 60 and shape.depth == 3
    # open recipients only: dave@remote.example was delivered
    assert shape.by_domain == {"remote.example": 2, "other.example": 1}
    assert shape.oldest_arrival.isoformat() == "2026-01-01T00:00:01+00:00"

    many = [{"id": str(n), "status": "active", "size": 1, "arrival": "2026-01-01T00:00:00+00:00", "sender": "",
             "recipients": [{"address": f"x@d{n}.example", "status": "pending", "attempts": 0, "last_error": None}]}
            for n in range(60)]
    shape = service.shape_of(many, max_domains=50)
    assert len(shape.by_domain) == 51 and shape.by_domain["other"] == 10


def test_snapshot_is_cached():
    calls = []
    spool = SimpleNamespace(summaries=lambda: calls.append(1) or SUMMARIES)
    now = [100.0]
    snapshot = service.QueueSnapshot(spool, ttl=2.0, clock=lambda: now[0])
    snapshot.get()
    snapshot.get()
    now[0] += 2.5
    assert snapshot.get().depth == 3
    assert len(calls) == 2


def test_queue_collector_always_has_every_status():
    from mta import metrics
    collector = metrics.QueueCollector(lambda: service.QueueShape())
    families = {family.name: family for family in collector.collect()}
    statuses = {s.labels["status"]: s.value for s in families["mta_queue_messages"].samples}
    assert statuses == {"active": 0, "deferred": 0, "hold": 0, "bounce": 0}
    assert families["mta_queue_oldest_age_seconds"].samples[0].value == 0
    assert families["mta_queue_bytes"].samples[0].value == 0


class _Listener:
    """Looks like mta.smtp.server.Listener to health(): a thread alive or dead."""

    def __init__(self, stop: threading.Event | None):
        self.mode, self.server_address, self.port = "relay", ("127.0.0.1", 2525), 2525
        self.thread = threading.Thread(target=stop.wait if stop else (lambda: None), daemon=True)
        self.thread.start()
        if stop is None:
            self.thread.join()


def test_health_reports_dead_listener(tmp_path):
    (tmp_path / "tmp").mkdir()
    spool = SimpleNamespace(root=str(tmp_path), min_free=0, free_bytes=lambda: 10 ** 9, summaries=lambda: [])
    stop = threading.Event()
    alive, dead = _Listener(stop), _Listener(None)
    ok, body = service.health(fake_deps(spool=spool, listeners=[alive]))
    assert ok and body["status"] == "ok" and body["listeners"][0]["up"] is True
    ok, body = service.health(fake_deps(spool=spool, listeners=[alive, dead]))
    assert not ok and body["status"] == "unavailable"
    assert "relay listener on 127.0.0.1 port 2525 is down" in body["reason"]
    stop.set()
    assert list((tmp_path / "tmp").iterdir()) == [], "the writability probe left a file behind"

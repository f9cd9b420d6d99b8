"""The admin REST API over real HTTP against the running daemon (issue 5).

Every route of INTERFACE.md ("Admin API") with its shapes; bearer-token
authentication (RFC 6750: 401 with WWW-Authenticate: Bearer, the token never
logged); bad bodies and query strings (400/415/422), unknown ids (404),
conflicts (409), oversized bodies (413), all in the one error shape;
concurrent requests while mail flows; the Prometheus output (names from
INTERFACE.md, `promtool check metrics`); /api/health 200 and 503; the curl
examples of the README's Admin API section run verbatim; and the issue's integration
scenario: a user added through the API can AUTH over SMTP, a blacklist entry
added through the API refuses MAIL with 554 5.7.1, a message held through
the API shows "hold" in `mta queue list --json`.

The daemon is a black box started by conftest's factories (ports picked at
random, admin token "test-admin-token"); clients are http.client, smtplib,
curl and promtool.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass

import pytest

from conftest import REPO_ROOT, assert_reply
from conftest import poll as wait_for

TOKEN = "test-admin-token"
STATUSES = ("active", "deferred", "hold", "bounce")
REQUIRED_METRICS = ("mta_queue_messages", "mta_smtp_sessions_total", "mta_messages_received_total",
                    "mta_messages_rejected_total", "mta_delivery_attempts_total",
                    "mta_delivery_duration_seconds")
README = REPO_ROOT / "README.md"
MISSING = object()


# --------------------------------------------------------------------------
# helpers

@dataclass
class Response:
    status: int
    headers: dict
    body: bytes

    def json(self):
        assert self.headers.get("content-type", "").startswith("application/json"), self
        return json.loads(self.body)

    def __str__(self) -> str:
        return f"{self.status} {self.body[:500]!r}"


class Api:
    """A tiny HTTP client for one daemon's admin port."""

    def __init__(self, server, token: str | None = TOKEN, *, ready: bool = True):
        self.server = server
        self.port = server.config["port_admin"]
        self.token = token
        if ready:
            self.wait_ready()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """conftest waits for the relay banner; the other listener threads start a moment later."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.get("/api/health", token=None).status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)

    def request(self, method: str, path: str, body=MISSING, *, token=MISSING, headers: dict | None = None,
                content_type: str | None = "application/json", conn: http.client.HTTPConnection | None = None
                ) -> Response:
        own = conn is None
        conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        send_headers = {}
        token = self.token if token is MISSING else token
        if token is not None:
            send_headers["Authorization"] = f"Bearer {token}"
        data = None
        if body is not MISSING:
            data = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
            if content_type:
                send_headers["Content-Type"] = content_type
        send_headers.update(headers or {})
        try:
            conn.request(method, path, body=data, headers=send_headers)
            reply = conn.getresponse()
            return Response(reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read())
        finally:
            if own:
                conn.close()

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=MISSING, **kw):
        return self.request("POST", path, body, **kw)

    def put(self, path, body=MISSING, **kw):
        return self.request("PUT", path, body, **kw)

    def delete(self, path, **kw):
        return self.request("DELETE", path, **kw)

    def ok(self, method: str, path: str, body=MISSING, status: int = 200):
        response = self.request(method, path, body)
        assert response.status == status, f"{method} {path}: {response}"
        return response.json() if response.body else None


def assert_error(response: Response, status: int, error: str | None = None, detail: str | None = None) -> dict:
    """The one error shape: {"error": "...", "detail": ...} with the status."""
    assert response.status == status, f"expected {status}, got {response}"
    data = response.json()
    assert set(data) == {"error", "detail"}, data
    assert isinstance(data["error"], str) and data["detail"], data
    if error is not None:
        assert data["error"] == error, data
    if detail is not None:
        assert re.search(detail, str(data["detail"]), re.I), data
    return data


def unverified_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def protected_routes(doc: dict) -> list[tuple[str, str]]:
    """(METHOD, concrete path) for every documented route that needs the token."""
    routes = []
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if operation.get("security") == [] or path == "/api/metrics":
                continue
            concrete = (path.replace("{id}", "0000000000000000ABCDEF").replace("{username}", "x@example.com")
                        .replace("{ip}", "192.0.2.1").replace("{sender}", "a@example.org")
                        .replace("{domain}", "example.org"))
            routes.append((method.upper(), concrete))
    return routes


# --------------------------------------------------------------------------
# fixtures

@pytest.fixture(scope="module")
def srv(module_mta_factory):
    """A daemon shared by the read-mostly tests of this module."""
    server = module_mta_factory(name="admin-shared")
    return server


@pytest.fixture(scope="module")
def api(srv) -> Api:
    return Api(srv)


# --------------------------------------------------------------------------
# health, openapi, metrics

def test_health_ok(api):
    """GET /api/health: listeners up, spool writable with free space, queue depth, workers."""
    response = api.get("/api/health", token=None)
    assert response.status == 200, response
    body = response.json()
    assert body["status"] == "ok"
    modes = {(item["mode"], item["port"]) for item in body["listeners"]}
    config = api.server.config
    assert modes == {("relay", config["port_relay"]), ("submission", config["port_submission"]),
                     ("submissions", config["port_submissions"])}
    assert all(item["up"] is True and item["address"] == "127.0.0.1" for item in body["listeners"])
    assert body["spool"]["writable"] is True and body["spool"]["free_bytes"] > 0
    assert isinstance(body["queue"]["depth"], int)
    assert body["delivery"]["workers"] == 0 and body["delivery"]["paused"] is True
    assert "reason" not in body


def test_health_503_when_spool_not_writable(mta_factory):
    """The readiness probe creates and removes a file in spool tmp/; failing that is 503."""
    server = mta_factory()
    api = Api(server)
    tmp = server.spool_dir / "tmp"
    assert api.get("/api/health").status == 200
    shutil.rmtree(tmp)
    tmp.write_text("not a directory\n")
    try:
        response = api.get("/api/health", token=None)
        assert response.status == 503, response
        body = response.json()
        assert body["status"] == "unavailable"
        assert body["spool"]["writable"] is False
        assert "spool not writable" in body["reason"]
    finally:
        tmp.unlink()
        tmp.mkdir()
    assert api.get("/api/health").json()["status"] == "ok"
    assert list(tmp.iterdir()) == [], "the health probe left a file in tmp/"


def test_openapi_document(api):
    """Served without a token; documents every INTERFACE.md route."""
    response = api.get("/api/openapi.json", token=None)
    assert response.status == 200
    doc = response.json()
    assert doc["openapi"].startswith("3.0")
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    paths = doc["paths"]
    expected = {
        "/api/health": {"get"}, "/api/metrics": {"get"}, "/api/queue/stats": {"get"},
        "/api/queue/messages": {"get"}, "/api/queue/messages/{id}": {"get", "delete"},
        "/api/queue/messages/{id}/retry": {"post"}, "/api/queue/messages/{id}/hold": {"post"},
        "/api/queue/messages/{id}/release": {"post"}, "/api/queue/flush": {"post"},
        "/api/auth/users": {"get", "post"}, "/api/auth/users/{username}": {"get", "put", "delete"},
        "/api/policy/ratelimits": {"get"}, "/api/policy/greylist": {"get"},
    }
    for name in ("blacklist", "whitelist"):
        for field in ("ip", "sender", "domain"):
            expected[f"/api/policy/{name}/{field}"] = {"get", "post"}
            expected[f"/api/policy/{name}/{field}/{{{field}}}"] = {"delete"}
    for path, methods in expected.items():
        assert path in paths, path
        assert set(paths[path]) == methods, (path, set(paths[path]))
    # the headers choice is written down
    message = doc["components"]["schemas"]["Message"]["allOf"][1]["properties"]["headers"]
    assert message["type"] == "array"


def test_metrics(srv, api):
    """Prometheus text format 0.0.4 with the INTERFACE.md names; no token needed by default."""
    srv.send(recipients=["bob@remote.example"], subject="metrics")
    with srv.session() as c:  # one refusal, so mta_messages_rejected_total has a series
        assert_reply(c.cmd("MAIL FROM:<a@example.org>"), 250)
        assert_reply(c.cmd("RCPT TO:<nobody@example.com>"), 550, "5.1.1")   # unknown local user
        c.cmd("QUIT")
    response = api.get("/api/metrics", token=None)
    assert response.status == 200, response
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = response.body.decode()
    for name in REQUIRED_METRICS:
        assert re.search(rf"^# TYPE {name} ", text, re.M), f"{name} not declared"
    for status in STATUSES:
        assert re.search(rf'^mta_queue_messages{{status="{status}"}} \d', text, re.M), status
    assert re.search(r'^mta_smtp_sessions_total\{port="relay"\} [1-9]', text, re.M)
    assert re.search(r'^mta_messages_received_total\{port="relay"\} [1-9]', text, re.M)
    assert re.search(r"^mta_messages_rejected_total\{reason=", text, re.M)
    assert re.search(r'^mta_delivery_duration_seconds_bucket\{le="\+Inf"\} ', text, re.M)
    assert re.search(r"^mta_queue_oldest_age_seconds ", text, re.M)
    # the queue gauges come from a scan cached for 2 s
    assert wait_for(lambda: re.search(r'^mta_queue_messages_by_domain\{domain="remote.example"\} [1-9]',
                                      api.get("/api/metrics").body.decode(), re.M), timeout=5)
    assert re.search(r"^mta_queue_bytes [1-9]", api.get("/api/metrics").body.decode(), re.M)


def test_metrics_queue_gauges_follow_the_queue(mta_factory):
    """Hold changes mta_queue_messages within the 2 s cache."""
    server = mta_factory()
    api = Api(server)

    def gauge(status):
        text = api.get("/api/metrics").body.decode()
        return float(re.search(rf'^mta_queue_messages{{status="{status}"}} (\S+)', text, re.M).group(1))

    assert gauge("active") == 0 and gauge("hold") == 0
    qid = server.send()
    api.ok("POST", f"/api/queue/messages/{qid}/hold")
    assert wait_for(lambda: gauge("hold") == 1, timeout=5), "hold not seen in metrics"
    assert gauge("active") == 0


def test_promtool_check_metrics(srv, api):
    """The output passes `promtool check metrics` (Debian package prometheus)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package: prometheus)")
    srv.send(subject="promtool")
    text = api.get("/api/metrics").body
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


def test_metrics_can_be_protected(mta_factory):
    """admin_protect_metrics = true puts /api/metrics behind the token too."""
    server = mta_factory({"admin_protect_metrics": True})
    api = Api(server)
    response = api.get("/api/metrics", token=None)
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert api.get("/api/metrics").status == 200
    assert api.get("/api/health", token=None).status == 200


# --------------------------------------------------------------------------
# authentication

def test_every_protected_route_needs_the_token(api):
    """RFC 6750 3: no token, a wrong one or another scheme is 401 with WWW-Authenticate: Bearer."""
    routes = protected_routes(api.get("/api/openapi.json", token=None).json())
    assert len(routes) > 25
    for method, path in routes:
        for token, headers in ((None, None), ("wrong-token", None), (MISSING, {"Authorization": f"Basic {TOKEN}"}),
                               (TOKEN + "x", None), (TOKEN[:-1], None), ("", None)):
            response = api.request(method, path, token=token if token is not MISSING else None,
                                   headers=headers)
            assert_error(response, 401, "unauthorized")
            assert response.headers["www-authenticate"].startswith("Bearer"), (method, path)
            assert response.headers["cache-control"] == "no-store"
    # the scheme is case-insensitive (RFC 7235 2.1)
    response = api.get("/api/queue/stats", token=None, headers={"Authorization": f"bearer {TOKEN}"})
    assert response.status == 200, response
    # unknown paths are not revealed without a token
    assert_error(api.get("/api/no/such/thing", token=None), 401)


def test_token_is_never_logged(mta_factory):
    server = mta_factory()
    api = Api(server)
    api.get("/api/queue/stats")
    api.get("/api/queue/stats", token="wrong-token")
    api.get("/api/queue/messages/XYZ")
    api.post("/api/auth/users", b"{bad json")
    server.stop()
    for text in (server.log_text("mta.log"), server.log_text("smtp.log"), server.stderr_text()):
        assert TOKEN not in text and "wrong-token" not in text


def test_sigterm_while_requests_run_stops_cleanly(mta_factory):
    """Shutdown race (CI regression): Waitress workers wake the event loop through
    a trigger pipe after each request; closing that pipe before they finish gave
    EBADF tracebacks in mta.log, or a stray byte in a reused fd. conftest fails
    the test on any Traceback in the logs."""
    for _ in range(6):
        server = mta_factory()
        api = Api(server)
        stop = threading.Event()
        answered = []

        def hammer():
            while not stop.is_set():
                try:
                    answered.append(api.get("/api/queue/stats").status)
                except OSError:
                    pass

        clients = [threading.Thread(target=hammer) for _ in range(8)]
        for client in clients:
            client.start()
        wait_for(lambda: len(answered) >= 20, timeout=10)
        assert server.stop() == 0
        stop.set()
        for client in clients:
            client.join(10)
        assert set(answered) == {200}
        log = server.log_text("mta.log")
        assert "Traceback" not in log and "Bad file descriptor" not in log, log[-3000:]


# --------------------------------------------------------------------------
# errors: one shape

def test_unknown_route_and_method(api):
    assert_error(api.get("/api/nothing/here"), 404, "not_found")
    response = api.put("/api/queue/stats", {})
    assert_error(response, 405, "method_not_allowed")
    assert "GET" in response.headers["allow"]
    assert_error(api.request("PATCH", "/api/auth/users"), 405)


def test_bad_bodies(api):
    cases = [
        (b"{not json", "application/json", 400, "bad_request", "malformed JSON"),
        (b"[1, 2]", "application/json", 400, "bad_request", "JSON object"),
        (b'"alice"', "application/json", 400, "bad_request", "JSON object"),
        (b"", "application/json", 400, "bad_request", None),
        (b"\xff\xfe{}", "application/json", 400, "bad_request", "UTF-8"),
        (b'{"username": "a@example.com"}', "application/json", 400, "bad_request", "missing field: password"),
        (b'{"username": "a@example.com", "password": 5}', "application/json", 400, "bad_request", "string"),
        (b'{"username": ["a"], "password": "x"}', "application/json", 400, "bad_request", "string"),
        (b'{"username": "a@example.com", "password": "x", "admin": true}', "application/json", 400,
         "bad_request", "unknown field"),
        (b'{"username": "a@example.com", "password": "x"}', "text/plain", 415, "unsupported_media_type", None),
        (b'username=a', "application/x-www-form-urlencoded", 415, "unsupported_media_type", None),
    ]
    for body, content_type, status, error, detail in cases:
        assert_error(api.post("/api/auth/users", body, content_type=content_type), status, error, detail)
    assert api.ok("GET", "/api/auth/users")["total"] == 0, "a bad request created a user"
    # bodies on the action routes must be empty or {}
    assert_error(api.post("/api/queue/flush", {"now": True}), 400, "bad_request", "unknown field")
    assert api.post("/api/queue/flush", {}).status == 200
    assert api.post("/api/queue/flush").status == 200


def test_oversized_body_is_413(api):
    big = json.dumps({"username": "a@example.com", "password": "x" * 100_000}).encode()
    assert_error(api.post("/api/auth/users", big), 413, "payload_too_large")
    assert_error(api.post("/api/auth/users", big, token=None), 401)   # the token is checked first
    assert_error(api.post("/api/policy/blacklist/ip", b" " * (64 * 1024 + 1)), 413)
    # chunked, without a Content-Length
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=30)
    try:
        conn.putrequest("POST", "/api/auth/users")
        conn.putheader("Authorization", f"Bearer {TOKEN}")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        chunk = b"x" * 70_000
        conn.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunk), chunk))
        reply = conn.getresponse()
        assert reply.status == 413
        assert json.loads(reply.read())["error"] == "payload_too_large"
    finally:
        conn.close()


def test_bad_query_strings(api):
    assert_error(api.get("/api/queue/messages?status=queued"), 422, "invalid", "status")
    assert_error(api.get("/api/queue/messages?status="), 422, "invalid")
    assert_error(api.get("/api/queue/messages?limit=abc"), 400, "bad_request", "integer")
    assert_error(api.get("/api/queue/messages?limit=0"), 422, "invalid", "limit")
    assert_error(api.get("/api/queue/messages?limit=1001"), 422, "invalid")
    assert_error(api.get("/api/queue/messages?offset=-1"), 422, "invalid", "offset")
    assert_error(api.get("/api/queue/messages?state=hold"), 400, "bad_request", "unknown query parameter")
    assert_error(api.get("/api/queue/messages?limit=1&limit=2"), 400, "bad_request", "more than once")
    assert_error(api.get("/api/auth/users?limit=x"), 400)
    assert_error(api.get("/api/queue/stats?verbose=1"), 400)


# --------------------------------------------------------------------------
# queue

def test_queue_stats_and_listing(mta_factory):
    server = mta_factory()
    api = Api(server)
    empty = api.ok("GET", "/api/queue/stats")
    assert empty == {"by_status": {s: 0 for s in STATUSES}, "bytes": 0, "oldest_age_seconds": 0}
    assert api.ok("GET", "/api/queue/messages") == {"items": [], "total": 0}

    ids = [server.send(sender="alice@example.org", recipients=["bob@remote.example"], subject="one"),
           server.send(sender="Carol@Other.example", recipients=["dave@far.example", "erin@remote.example"],
                       subject="two"),
           server.send(sender="", recipients=["bob@remote.example"], subject="three")]
    listing = api.ok("GET", "/api/queue/messages")
    assert listing["total"] == 3 and [m["id"] for m in listing["items"]] == ids   # oldest first
    item = listing["items"][1]
    assert set(item) >= {"id", "status", "size", "arrival", "sender", "recipients"}
    assert item["status"] == "active" and item["sender"] == "Carol@Other.example" and item["size"] > 0
    assert item["recipients"] == [
        {"address": "dave@far.example", "status": "pending", "attempts": 0, "last_error": None},
        {"address": "erin@remote.example", "status": "pending", "attempts": 0, "last_error": None}]
    # the API and `mta queue list --json` agree
    assert [m["id"] for m in server.queue_list()] == ids

    def ids_of(query):
        data = api.ok("GET", "/api/queue/messages?" + query)
        return [m["id"] for m in data["items"]], data["total"]

    assert ids_of("limit=2") == (ids[:2], 3)
    assert ids_of("limit=2&offset=2") == (ids[2:], 3)
    assert ids_of("offset=5") == ([], 3)
    assert ids_of("sender=carol@other.example") == ([ids[1]], 1)
    assert ids_of("sender=%40other.example") == ([ids[1]], 1)
    assert ids_of("sender=%3C%3E") == ([ids[2]], 1)
    assert ids_of("recipient=bob@remote.example") == ([ids[0], ids[2]], 2)
    assert ids_of("recipient=@remote.example&limit=1") == ([ids[0]], 3)
    assert ids_of("status=hold") == ([], 0)
    api.ok("POST", f"/api/queue/messages/{ids[0]}/hold")
    assert ids_of("status=hold") == ([ids[0]], 1)
    assert ids_of("status=active&recipient=bob@remote.example") == ([ids[2]], 1)

    stats = api.ok("GET", "/api/queue/stats")
    assert stats["by_status"] == {"active": 2, "deferred": 0, "hold": 1, "bounce": 0}
    assert stats["bytes"] == sum(m["size"] for m in listing["items"])
    assert stats["oldest_age_seconds"] >= 0


def test_queue_message_detail(srv, api):
    qid = srv.send(sender="alice@example.org", recipients=["bob@remote.example"], subject="detail test")
    message = api.ok("GET", f"/api/queue/messages/{qid}")
    assert message["id"] == qid and message["status"] == "active" and message["sender"] == "alice@example.org"
    assert message["recipients"] == [{"address": "bob@remote.example", "status": "pending", "attempts": 0,
                                      "last_error": None}]
    headers = message["headers"]
    assert all(isinstance(pair, list) and len(pair) == 2 for pair in headers), headers
    assert headers[0][0] == "Received" and "\r" not in headers[0][1] and "\n" not in headers[0][1]
    assert ["Subject", "detail test"] in headers
    assert_error(api.get("/api/queue/messages/0000000000000000ABCDEF"), 404, "not_found")
    assert_error(api.get("/api/queue/messages/not-a-queue-id"), 404, "not_found")
    assert_error(api.get("/api/queue/messages/..%2F..%2Fetc"), 404)


def test_queue_actions(mta_factory):
    """hold/release/retry/delete act like postsuper, with 404 and 409 where they must."""
    server = mta_factory()
    api = Api(server)
    qid = server.send()
    base = f"/api/queue/messages/{qid}"

    assert api.ok("POST", base + "/hold") == {"id": qid, "status": "hold"}
    assert server.queue_list()[0]["status"] == "hold"
    assert api.ok("POST", base + "/hold") == {"id": qid, "status": "hold"}   # like postsuper -h: no error
    assert_error(api.post(base + "/retry"), 409, "conflict", "on hold")
    assert api.ok("POST", base + "/release") == {"id": qid, "status": "active"}
    assert server.queue_list()[0]["status"] == "active"
    assert_error(api.post(base + "/release"), 409, "conflict", "not on hold")
    assert api.ok("POST", base + "/retry") == {"id": qid, "status": "active"}
    assert api.ok("POST", "/api/queue/flush") == {"flushed": 0}

    response = api.delete(base)
    assert response.status == 204 and response.body == b""
    assert server.queue_list() == []
    for method, path in (("GET", base), ("DELETE", base), ("POST", base + "/hold"),
                         ("POST", base + "/release"), ("POST", base + "/retry")):
        assert_error(api.request(method, path), 404, "not_found")
    # the CLI sees the API's changes and the API sees the CLI's
    other = server.send()
    assert server.cli("queue", "hold", other).returncode == 0
    assert api.ok("GET", f"/api/queue/messages/{other}")["status"] == "hold"


def test_retry_and_flush_take_effect_at_once(mta_factory):
    """A deferred message (backoff 300 s) is tried again right after retry, and after flush."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]   # bound, never listening: connections are refused
    server = mta_factory({"delivery_workers": 1, "relayhost": f"[127.0.0.1]:{port}", "backoff_min": 300,
                          "backoff_max": 600})
    try:
        api = Api(server)
        qid = server.send(recipients=["bob@remote.example"])
        base = f"/api/queue/messages/{qid}"

        def attempts():
            message = api.get(base).json()
            return message["recipients"][0]["attempts"] if message["status"] == "deferred" else 0

        assert wait_for(lambda: attempts() == 1), api.get(base)
        health = api.ok("GET", "/api/health")
        assert health["delivery"] == {"workers": 1, "paused": False, "active": health["delivery"]["active"]}
        api.ok("POST", base + "/retry")
        assert wait_for(lambda: attempts() == 2, timeout=10), f"retry did not take effect: {api.get(base)}"
        assert api.ok("POST", "/api/queue/flush") == {"flushed": 1}
        assert wait_for(lambda: attempts() == 3, timeout=10), f"flush did not take effect: {api.get(base)}"
    finally:
        closed.close()


# --------------------------------------------------------------------------
# users

def test_users(mta_factory):
    server = mta_factory()
    api = Api(server)
    assert api.ok("GET", "/api/auth/users") == {"items": [], "total": 0}

    response = api.post("/api/auth/users", {"username": "Alice@Example.com", "password": "first-Passw0rd"})
    assert response.status == 201, response
    created = response.json()
    assert created["username"] == "alice@example.com" and created["created"]
    assert response.headers["location"] == "/api/auth/users/alice@example.com"
    assert set(created) <= {"username", "created", "changed"}

    assert_error(api.post("/api/auth/users", {"username": "alice@example.com", "password": "x"}), 409, "conflict")
    for username in ("alice", "alice@", "@example.com", "a b@example.com", ""):
        assert_error(api.post("/api/auth/users", {"username": username, "password": "pw"}), 422, "invalid")
    for password in ("", "two\nlines", "x" * 2000):
        assert_error(api.post("/api/auth/users", {"username": "bob@example.com", "password": password}),
                     422, "invalid")

    listing = api.get("/api/auth/users")
    assert listing.json()["total"] == 1 and listing.json()["items"][0]["username"] == "alice@example.com"
    one = api.ok("GET", "/api/auth/users/ALICE@example.com")
    assert one["username"] == "alice@example.com"
    for text in (listing.body, api.get("/api/auth/users/alice@example.com").body):
        assert b"$2b$" not in text and b"hash" not in text, "a password hash was returned"
    # the CLI sees the same users
    assert server.cli("user", "list").stdout.split() == ["alice@example.com"]

    changed = api.ok("PUT", "/api/auth/users/alice@example.com", {"password": "second-Passw0rd"})
    assert changed["username"] == "alice@example.com" and changed["changed"]
    assert_error(api.put("/api/auth/users/alice@example.com", {"password": ""}), 422, "invalid")
    assert_error(api.put("/api/auth/users/alice@example.com", {"pass": "x"}), 400, "bad_request")
    assert_error(api.put("/api/auth/users/nobody@example.com", {"password": "x"}), 404, "not_found")
    assert_error(api.get("/api/auth/users/nobody@example.com"), 404, "not_found")
    assert_error(api.get("/api/auth/users/not-an-address"), 404, "not_found")

    assert api.delete("/api/auth/users/alice@example.com").status == 204
    assert_error(api.delete("/api/auth/users/alice@example.com"), 404, "not_found")
    assert api.ok("GET", "/api/auth/users")["total"] == 0


# --------------------------------------------------------------------------
# black and white lists

@pytest.mark.parametrize("name", ["blacklist", "whitelist"])
def test_policy_lists(mta_factory, name):
    server = mta_factory()
    api = Api(server)
    cases = {
        "ip": [("192.0.2.7", "192.0.2.7", "192.0.2.7"), ("198.51.100.0/24", "198.51.100.0/24", "198.51.100.0%2F24"),
               ("10.1.2.3/8", "10.0.0.0/8", "10.0.0.0%2F8"), ("2001:DB8::/32", "2001:db8::/32", "2001:db8::%2F32")],
        "sender": [("Spammer@Bad.example", "spammer@bad.example", "spammer@bad.example")],
        "domain": [("Bad.Example", "bad.example", "bad.example")],
    }
    invalid = {"ip": ["300.1.1.1", "10.0.0.0/33", "example.com"], "sender": ["no-at-sign", "a@"],
               "domain": ["bad..example", "-x.example"]}
    for field, entries in cases.items():
        path = f"/api/policy/{name}/{field}"
        assert api.ok("GET", path) == {"items": [], "total": 0}
        for value, normalized, in_path in entries:
            response = api.post(path, {field: value})
            assert response.status == 201, response
            assert response.json() == {field: normalized}
            assert response.headers["location"] == f"{path}/{in_path}"
            assert_error(api.post(path, {field: value}), 409, "conflict")
        listing = api.ok("GET", path)
        assert listing == {"items": [n for _, n, _ in entries], "total": len(entries)}
        assert api.ok("GET", path + "?limit=1&offset=1")["items"] == [n for _, n, _ in entries][1:2]
        for bad in invalid[field]:
            assert_error(api.post(path, {field: bad}), 422, "invalid")
        other = next(f for f in cases if f != field)
        assert_error(api.post(path, {other: "x"}), 400, "bad_request", "unknown field")
        assert_error(api.post(path, {field: 7}), 400, "bad_request")
        for _, _, in_path in entries:
            response = api.delete(f"{path}/{in_path}")
            assert response.status == 204, (in_path, response)
            assert_error(api.delete(f"{path}/{in_path}"), 404, "not_found")
        assert api.ok("GET", path)["total"] == 0
    assert_error(api.delete(f"/api/policy/{name}/ip/not-an-ip"), 404)
    assert_error(api.get(f"/api/policy/{name}/color"), 404)


def test_ratelimits_and_greylist(mta_factory):
    """The anti-abuse state: rate-limit buckets (100/hour: one message leaves 99.x tokens
    for half a minute) and greylisting, in the list shape."""
    server = mta_factory({"rate_limit_ip": 100, "rate_limit_domain": 1000})
    api = Api(server)
    assert api.ok("GET", "/api/policy/ratelimits") == {"items": [], "total": 0}   # full buckets are not kept
    server.send(sender="sender@example.org")
    buckets = api.ok("GET", "/api/policy/ratelimits")
    assert set(buckets) == {"items", "total"} and buckets["total"] == len(buckets["items"]) == 2
    by_kind = {b["kind"]: b for b in buckets["items"]}
    assert by_kind["ip"]["key"] == "127.0.0.1" and by_kind["ip"]["limit_per_hour"] == 100
    assert 98.9 < by_kind["ip"]["tokens"] < 100
    assert by_kind["domain"]["key"] == "example.org" and by_kind["domain"]["limit_per_hour"] == 1000
    assert api.ok("GET", "/api/policy/ratelimits?limit=1")["total"] == 2
    assert len(api.ok("GET", "/api/policy/ratelimits?limit=1")["items"]) == 1
    greylist = api.ok("GET", "/api/policy/greylist")
    assert greylist["items"] == [] and greylist["total"] == 0
    assert greylist["summary"]["enabled"] is False and greylist["summary"]["triplets"] == 0


# --------------------------------------------------------------------------
# the whole system

def test_api_changes_take_effect_over_smtp(mta_factory):
    """Issue 5: a user added by the API can AUTH; a blacklist entry refuses MAIL; a hold shows in the CLI."""
    server = mta_factory()
    api = Api(server)

    # a user: AUTH on the submission port (STARTTLS first, RFC 6409 / RFC 4954)
    api.ok("POST", "/api/auth/users", {"username": "carol@example.com", "password": "Car0l-secret"}, status=201)
    with smtplib.SMTP("127.0.0.1", server.submission_port, timeout=30) as client:
        client.starttls(context=unverified_context())
        code, _ = client.login("carol@example.com", "Car0l-secret")
        assert code == 235
    api.ok("PUT", "/api/auth/users/carol@example.com", {"password": "New-secret-1"})
    with smtplib.SMTP("127.0.0.1", server.submission_port, timeout=30) as client:
        client.starttls(context=unverified_context())
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("carol@example.com", "Car0l-secret")
        assert client.login("carol@example.com", "New-secret-1")[0] == 235

    # a blacklist entry: checked at MAIL, 554 5.7.1
    api.ok("POST", "/api/policy/blacklist/ip", {"ip": "127.0.0.0/8"}, status=201)
    with server.session() as conn:
        assert_reply(conn.cmd("MAIL FROM:<sender@example.org>"), 554, "5.7.1")
    assert api.delete("/api/policy/blacklist/ip/127.0.0.0%2F8").status == 204
    with server.session() as conn:
        assert_reply(conn.cmd("MAIL FROM:<sender@example.org>"), 250)
    api.ok("POST", "/api/policy/blacklist/sender", {"sender": "sender@example.org"}, status=201)
    with server.session() as conn:
        assert_reply(conn.cmd("MAIL FROM:<sender@example.org>"), 554, "5.7.1")
        assert_reply(conn.cmd("MAIL FROM:<other@example.org>"), 250)

    # a hold: seen by `mta queue list --json`
    qid = server.send(sender="other@example.org")
    api.ok("POST", f"/api/queue/messages/{qid}/hold")
    assert {m["id"]: m["status"] for m in server.queue_list()} == {qid: "hold"}
    assert [m["id"] for m in server.queue_list("--status", "hold")] == [qid]


def test_concurrent_requests_while_mail_flows(mta_factory):
    """8 threads list the queue while smtplib sends 50 messages: every answer is a valid 200."""
    server = mta_factory()
    api = Api(server)
    done = threading.Event()
    errors: list[str] = []
    counts = [0] * 8

    def reader(index: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=30)
        try:
            while not done.is_set():
                path = "/api/queue/messages?limit=20" if index % 2 else "/api/queue/stats"
                response = api.get(path, conn=conn)
                if response.status != 200:
                    errors.append(str(response))
                    return
                data = response.json()
                if index % 2 and not (isinstance(data["items"], list) and data["total"] >= len(data["items"])):
                    errors.append(f"bad listing {data}")
                counts[index] += 1
        except Exception as error:   # noqa: BLE001 - reported below
            errors.append(repr(error))
        finally:
            conn.close()

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    try:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
            for n in range(50):
                client.sendmail("sender@example.org", [f"user{n}@remote.example"],
                                f"Subject: flow {n}\r\n\r\nbody {n}\r\n".encode())
    finally:
        done.set()
        for thread in threads:
            thread.join(30)
    assert errors == []
    assert all(count > 0 for count in counts), counts
    assert api.ok("GET", "/api/queue/messages?limit=1")["total"] == 50
    assert api.ok("GET", "/api/queue/stats")["by_status"]["active"] == 50
    assert api.ok("GET", "/api/health")["queue"]["depth"] == 50 or wait_for(
        lambda: api.ok("GET", "/api/health")["queue"]["depth"] == 50, timeout=5)


def test_readme_examples_run_verbatim(mta_factory, tmp_path):
    """The curl examples of the README's Admin API section work as written (ports substituted)."""
    section = README.read_text().split("\n## Admin API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert len(blocks) >= 4
    script = "\n".join(blocks)
    assert "TOKEN=$(cat var/admin.token)" in script
    # like `make run`: no admin_token set, so the daemon writes var/admin.token
    server = mta_factory({"admin_token": None, "data_dir": str(tmp_path / "docs" / "var"),
                          "rate_limit_ip": None, "rate_limit_user": None, "rate_limit_domain": None}, name="docs")
    assert (server.root / "var" / "admin.token").is_file()
    Api(server, token=None)   # ready
    script = (script.replace("127.0.0.1:8080", f"127.0.0.1:{server.config['port_admin']}")
              .replace("127.0.0.1:2525", f"127.0.0.1:{server.port}"))
    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=server.root,
                          capture_output=True, text=True, timeout=120)
    output = proc.stdout
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout:\n{output}\nstderr:\n{proc.stderr}"
    expected = ['"status": "ok"', 'mta_queue_messages{status="active"}', "HTTP/1.1 401",
                "WWW-Authenticate: Bearer", '"by_status"', '"status": "hold"', '"headers"',
                '{"flushed": 0}', '"username": "alice@example.com"', '{"ip": "192.0.2.0/24"}',
                '{"items": ["192.0.2.0/24"], "total": 1}', '"limit_per_hour"', '"summary"']
    for text in expected:
        assert text.lower() in output.lower(), f"{text!r} not in output:\n{output}"
    assert output.count('"error"') == 1, f"an example failed:\n{output}"   # only the 401 example
    assert server.queue_ids() == []   # the message queued by curl was deleted by the last example
    assert server.cli("user", "list").stdout.strip() == ""


# --------------------------------------------------------------------------
# serving

def test_port_admin_zero_disables_the_api(mta_factory):
    server = mta_factory({"port_admin": 0})
    server.send()   # the rest of the daemon works
    assert "admin API disabled (port_admin = 0)" in server.log_text()
    assert "admin API listening" not in server.log_text()


def test_admin_port_in_use_stops_startup(mta_factory):
    """A bind error stops start-up with one line naming port_admin."""
    server = mta_factory(start=False)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", server.config["port_admin"]))
    blocker.listen(1)
    try:
        server.start(wait=False)
        assert server.proc.wait(15) != 0
        lines = [line for line in server.stderr_text().splitlines() if line.strip()]
        assert len(lines) == 1 and "port_admin" in lines[0], lines
        assert str(server.config["port_admin"]) in lines[0]
    finally:
        blocker.close()

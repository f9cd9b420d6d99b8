"""Property-based tests of the admin API's request parsing, in-process (issue 9).

The Falcon app (`mta.admin.app.create_app`) is driven through
`falcon.testing` with real stores in a temporary directory (a spool with
queued messages, users.json with cheap bcrypt rounds, policy.json), and
gets arbitrary methods, paths, query strings, tokens, content types and
bodies. INTERFACE.md "Admin API": errors are `{"error": ..., "detail": ...}`
with a proper status (400, 401, 404, 405, 409, 413, 415, 422); a request
must never reach the 500 handler (a traceback in mta.log) and never pass
without the token.

The live daemon's admin port is tested under bad tokens and oversized
bodies in test_faults.py.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from types import SimpleNamespace
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz_support import fuzz_settings

falcon_testing = pytest.importorskip("falcon.testing")

from mta.admin.app import MAX_BODY, create_app  # noqa: E402
from mta.admin.deps import AdminDeps  # noqa: E402
from mta.policy.lists import PolicyStore  # noqa: E402
from mta.spool import Envelope, Recipient, Spool  # noqa: E402
from mta.users import UserStore  # noqa: E402

TOKEN = "fuzz-admin-token"
OPEN = {"/api/health", "/api/metrics", "/api/openapi.json"}


@pytest.fixture(scope="module")
def client():
    directory = tempfile.mkdtemp(prefix="mta-admin-fuzz-")
    spool = Spool(f"{directory}/spool", 0)
    spool.recover()
    ids = []
    for n in range(3):
        entry = spool.inject(f"Subject: m{n}\r\n\r\nbody\r\n".encode(),
                             Envelope(id="", sender="a@example.org", recipients=[Recipient("b@example.com")]))
        ids.append(entry.id)
    spool.hold(ids[2])
    users = UserStore(f"{directory}/data", rounds=4)
    users.add("alice@example.com", "pw-alice")
    policy = PolicyStore(f"{directory}/data")
    config = SimpleNamespace(admin_protect_metrics=False, delivery_workers=0, greylist_enabled=False)
    app = create_app(AdminDeps(spool=spool, users=users, policy=policy, config=lambda: config, token=TOKEN))
    test_client = falcon_testing.TestClient(app)
    test_client.queue_ids = ids
    yield test_client
    shutil.rmtree(directory, ignore_errors=True)


segment_text = st.one_of(
    st.sampled_from(["", "x", "alice@example.com", "ALICE@EXAMPLE.COM", "127.0.0.1", "127.0.0.0%2F8",
                     "::1", "%2F", "%00", "%ff", "..", ".", "%2e%2e", "a%40b", "00000000000000000000",
                     "bob@example.com", "%", "%%", "%zz", "*"]),
    st.text(max_size=20).map(lambda s: quote(s, safe="")),
)


@st.composite
def paths(draw, ids):
    template = draw(st.sampled_from([
        "/api/health", "/api/metrics", "/api/openapi.json", "/api/queue/stats", "/api/queue/messages",
        "/api/queue/messages/{id}", "/api/queue/messages/{id}/retry", "/api/queue/messages/{id}/hold",
        "/api/queue/messages/{id}/release", "/api/queue/flush", "/api/auth/users", "/api/auth/users/{x}",
        "/api/policy/blacklist/ip", "/api/policy/whitelist/sender", "/api/policy/blacklist/domain",
        "/api/policy/blacklist/ip/{x}", "/api/policy/whitelist/domain/{x}", "/api/policy/ratelimits",
        "/api/policy/greylist", "/api/{x}", "/{x}", "/api/queue/messages/{id}/{x}"]))
    path = template.replace("{id}", draw(st.one_of(st.sampled_from(ids), segment_text)))
    return path.replace("{x}", draw(segment_text))


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=30)),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=10), children,
                                                                                max_size=3)),
    max_leaves=10)
bodies = st.one_of(
    st.none(),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({}, optional={"username": st.one_of(st.text(max_size=30), json_values),
                                        "password": st.one_of(st.text(max_size=30), json_values),
                                        "ip": st.one_of(st.sampled_from(["10.0.0.1", "10.0.0.0/8", "::/0", "1.2.3.4/33",
                                                                         "x"]), json_values),
                                        "sender": st.one_of(st.text(max_size=30), json_values),
                                        "domain": st.one_of(st.text(max_size=30), json_values)}
                        ).map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=100),
    st.sampled_from([b"{", b'{"a":', b"\xff\xfe", b"[]", b"null", b'{"ip": "1.2.3.4", "ip": 5}', b"   ",
                     b'{"username": "a@example.com", "password": "\\ud800"}', b"1e999999"]),
)
tokens = st.one_of(
    st.just(f"Bearer {TOKEN}"),
    st.sampled_from([None, "", "Bearer", "Bearer ", f"bearer {TOKEN}", f"Basic {TOKEN}", f"Bearer {TOKEN}x",
                     f"Bearer {TOKEN[:-1]}", f"Bearer  {TOKEN} ", "Bearer " + "A" * 10000, f"Bearer {TOKEN}\t"]),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xff), max_size=50),
)
content_types = st.sampled_from([None, "application/json", "application/json; charset=utf-8", "text/plain",
                                 "application/problem+json", "multipart/form-data", "", "x"])


def request(client, method, path, query, token, content_type, body):
    headers = {}
    if token is not None:
        headers["Authorization"] = token
    if content_type is not None:
        headers["Content-Type"] = content_type
    return client.simulate_request(method, path, query_string=query or None, headers=headers, body=body)


@fuzz_settings(500)
@given(data=st.data(), method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]),
       query=st.one_of(st.none(), st.sampled_from(["limit=1", "limit=0", "limit=-1", "limit=99999999999999999999",
                                                   "offset=x", "status=", "status=deferred", "status=nope",
                                                   "limit=1&limit=2", "foo=bar", "sender=%00", "recipient=*@*",
                                                   "limit=%C2%B2", "limit=%D9%A3", "offset=1e3"]),
                       st.text(max_size=30).map(lambda s: quote(s, safe="=&"))),
       token=tokens, content_type=content_types, body=bodies)
def test_admin_api_never_500_and_errors_are_json(client, data, method, query, token, content_type, body):
    """Any request: a documented status, JSON errors {"error", "detail"},
    never 500 (handle_unexpected), never 2xx on a protected route without
    the right token (RFC 6750)."""
    path = data.draw(paths(client.queue_ids))
    result = request(client, method, path, query, token, content_type, body)
    assert result.status_code != 500, (method, path, query, body, result.text[:500])
    assert result.status_code in (200, 201, 204, 400, 401, 404, 405, 409, 413, 415, 422, 503), \
        (method, path, result.status_code, result.text[:300])
    if result.status_code >= 400 and method != "HEAD":
        payload = result.json
        assert isinstance(payload, dict) and "error" in payload, result.text[:300]
    good_token = token is not None and token.strip().partition(" ")[0].lower() == "bearer" \
        and token.strip().partition(" ")[2].strip() == TOKEN
    if result.status_code < 300 and path.split("?")[0] not in OPEN:
        assert good_token, f"{method} {path} answered {result.status_code} with token {token!r}"


@fuzz_settings(30)
@given(size=st.integers(MAX_BODY + 1, MAX_BODY * 4), path=st.sampled_from(
    ["/api/auth/users", "/api/policy/blacklist/ip", "/api/queue/flush", "/api/health"]))
def test_admin_api_oversized_bodies_413(client, size, path):
    """Bodies over MAX_BODY are refused with 413 before parsing (memory bound)."""
    body = b'{"ip": "' + b"1" * size + b'"}'
    result = request(client, "POST", path, None, f"Bearer {TOKEN}", "application/json", body)
    assert result.status_code in (413, 405), (path, result.status_code, result.text[:200])

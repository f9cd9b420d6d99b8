"""The admin API as a Falcon WSGI app: `create_app(deps) -> falcon.App`.

Owns the HTTP side only: routes (INTERFACE.md, "Admin API"), bearer-token
authentication, JSON parsing and validation of bodies and query strings,
and the one error shape `{"error": "...", "detail": ...}` for every error
status (400, 401, 404, 405, 409, 413, 415, 422, 500, 503). Resources are
thin: they parse, call `mta.admin.service`, and shape the answer. Nothing
here touches the spool, users or policy files directly.

Security: the token is compared in constant time (`hmac.compare_digest`)
and never logged; every route but /api/health, /api/openapi.json and
/api/metrics (unless `admin_protect_metrics`) needs it. Bodies are capped
at MAX_BODY bytes (413) before they are parsed.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from urllib.parse import quote, unquote

import falcon
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mta import metrics
from mta.admin import openapi, service
from mta.policy.lists import FIELDS, LISTS

log = logging.getLogger("mta.admin")

MAX_BODY = 64 * 1024
OPEN_PATHS = frozenset({"/api/health", "/api/openapi.json"})
METRICS_PATH = "/api/metrics"
JSON_TYPES = ("application/json",)
_INTEGER = re.compile(r"-?[0-9]{1,18}\Z")

ERROR_NAMES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 409: "conflict", 411: "length_required", 413: "payload_too_large",
    415: "unsupported_media_type", 422: "invalid", 500: "internal_error", 503: "unavailable",
}
SERVICE_STATUS = (
    (service.Invalid, 422), (service.NotFound, 404), (service.Conflict, 409), (service.Unavailable, 503),
)


class ApiError(falcon.HTTPError):
    """An HTTP error with our shape: `error` is a short code, `detail` says why."""

    def __init__(self, code: int, detail, *, error: str | None = None, headers: dict | None = None):
        error = error or ERROR_NAMES.get(code, "error")
        super().__init__(falcon.code_to_http_status(code), title=error,
                         description=detail if isinstance(detail, str) else None, headers=headers)
        self.error = error
        self.detail = detail


def bad_request(detail) -> ApiError:
    return ApiError(400, detail)


# --- errors: one shape for all of them ---

def serialize_error(req, resp, exc) -> None:
    """Falcon's own errors (404 route, 405, bad headers) and ours, as JSON."""
    code = falcon.http_status_to_code(exc.status)
    error = getattr(exc, "error", None) or ERROR_NAMES.get(code, "error")
    detail = getattr(exc, "detail", None) or exc.description
    if detail is None:
        if code == 404:
            detail = f"no such resource: {req.path}"
        elif code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            detail = f"{req.method} is not allowed on {req.path} (allowed: {allowed})"
        else:
            detail = exc.title
    resp.data = json.dumps({"error": error, "detail": detail}, ensure_ascii=False).encode("utf-8")
    resp.content_type = falcon.MEDIA_JSON


def handle_service_error(req, resp, exc, params) -> None:
    for kind, code in SERVICE_STATUS:
        if isinstance(exc, kind):
            break
    else:
        code = 409
    raise ApiError(code, str(exc))


def handle_unexpected(req, resp, exc, params) -> None:
    # A bug costs one log entry (method and path only: never headers, so never the token).
    log.exception("admin API: internal error in %s %s", req.method, req.path)
    raise ApiError(500, "internal error; see mta.log")


# --- middleware ---

class RawPath:
    """Route on the path as the client sent it, so `%2F` stays inside a segment.

    WSGI servers decode PATH_INFO, which turns `127.0.0.0%2F8` into two
    segments. When the raw request URI has escapes, the path is rebuilt from
    it with only `%` and `/` re-escaped per segment, and the route fields are
    unescaped once more before the resource sees them.
    """

    def process_request(self, req, resp) -> None:
        raw = req.env.get("REQUEST_URI") or req.env.get("RAW_URI") or ""
        raw_path = raw.split("?", 1)[0]
        if "%" not in raw_path or not raw_path.startswith("/"):
            return
        segments = [unquote(part, errors="replace") for part in raw_path.split("/")]
        if "/".join(segments) != req.path:
            return      # mounted under a prefix or rewritten: keep the server's view
        req.path = "/".join(part.replace("%", "%25").replace("/", "%2F") for part in segments)
        req.context.escaped_fields = True

    def process_resource(self, req, resp, resource, params) -> None:
        if getattr(req.context, "escaped_fields", False):
            for name, value in params.items():
                params[name] = unquote(value)


class BearerAuth:
    """RFC 6750 bearer tokens, compared in constant time."""

    def __init__(self, token: str, protect_metrics):
        self._token = token.encode("utf-8")
        self._protect_metrics = protect_metrics

    def process_request(self, req, resp) -> None:
        if req.path in OPEN_PATHS or (req.path == METRICS_PATH and not self._protect_metrics()):
            return
        scheme, _, credentials = (req.get_header("Authorization") or "").strip().partition(" ")
        credentials = credentials.strip()
        if scheme.lower() != "bearer" or not credentials:
            raise ApiError(401, "missing bearer token: send Authorization: Bearer TOKEN",
                           headers={"WWW-Authenticate": 'Bearer realm="mta"'})
        # RFC 6750 3.1; compare_digest on bytes: constant time, any characters.
        if not hmac.compare_digest(credentials.encode("utf-8", "surrogateescape"), self._token):
            raise ApiError(401, "invalid bearer token",
                           headers={"WWW-Authenticate": 'Bearer realm="mta", error="invalid_token"'})


class BodyLimit:
    """Request bodies over MAX_BODY get 413 on every route, before parsing."""

    def process_request(self, req, resp) -> None:
        length = req.content_length
        if length is not None and length > MAX_BODY:
            raise ApiError(413, f"request body is {length} bytes; the limit is {MAX_BODY}")


class ResponseHeaders:
    """Answers hold queue and user data: never cached, never sniffed."""

    def process_response(self, req, resp, resource, req_succeeded) -> None:
        resp.set_header("Cache-Control", "no-store")
        resp.set_header("X-Content-Type-Options", "nosniff")


# --- request parsing ---

def read_json(req, fields: dict[str, type], *, optional: bool = False) -> dict:
    """The body as a JSON object with exactly `fields` (name -> type).

    400 for malformed JSON, a non-object, unknown or missing fields and wrong
    types; 413 over MAX_BODY; 415 for a non-JSON Content-Type. With
    `optional`, an empty body counts as {}.
    """
    content_type = (req.content_type or "").split(";", 1)[0].strip().lower()
    data = req.bounded_stream.read(MAX_BODY + 1)
    if len(data) > MAX_BODY:
        raise ApiError(413, f"request body is over the limit of {MAX_BODY} bytes")
    if not data.strip():
        if optional:
            return {}
        raise bad_request(f"expected a JSON object with {', '.join(fields)}")
    if content_type and content_type not in JSON_TYPES and not content_type.endswith("+json"):
        raise ApiError(415, f"send JSON with Content-Type: application/json, not {content_type}")
    try:
        body = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise bad_request("request body is not UTF-8") from None
    except ValueError as error:
        raise bad_request(f"malformed JSON: {error}") from None
    if not isinstance(body, dict):
        raise bad_request(f"expected a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise bad_request(f"unknown field(s): {', '.join(unknown)}; expected: {', '.join(fields) or 'none'}")
    for name, kind in fields.items():
        if name not in body:
            raise bad_request(f"missing field: {name}")
        if not isinstance(body[name], kind) or isinstance(body[name], bool) and kind is not bool:
            raise bad_request(f"field {name} must be a {_type_name(kind)}")
    return body


def _type_name(kind: type) -> str:
    return {str: "string", int: "integer", bool: "boolean"}.get(kind, kind.__name__)


def read_query(req, allowed: tuple[str, ...]) -> dict[str, str]:
    """Query parameters: only `allowed` ones, each at most once (400 otherwise)."""
    unknown = sorted(set(req.params) - set(allowed))
    if unknown:
        raise bad_request(f"unknown query parameter(s): {', '.join(unknown)}; "
                          f"allowed: {', '.join(allowed) or 'none'}")
    params = {}
    for name, value in req.params.items():
        if isinstance(value, list):
            raise bad_request(f"query parameter {name} given more than once")
        params[name] = value
    return params


def _integer(params: dict, name: str, default: int, minimum: int, maximum: int | None) -> int:
    raw = params.get(name)
    if raw is None:
        return default
    if not _INTEGER.match(raw):
        raise bad_request(f"{name} must be an integer, not {raw!r}")
    value = int(raw)
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"{minimum}..{maximum}" if maximum is not None else f">= {minimum}"
        raise ApiError(422, f"{name} must be {bounds}, not {value}")
    return value


PAGING = ("limit", "offset")


def paging(params: dict) -> dict:
    return {"limit": _integer(params, "limit", service.DEFAULT_LIMIT, 1, service.MAX_LIMIT),
            "offset": _integer(params, "offset", 0, 0, None)}


# --- resources ---

class Health:
    def __init__(self, deps):
        self.deps = deps

    def on_get(self, req, resp) -> None:
        read_query(req, ())
        ok, body = service.health(self.deps)
        resp.media = body
        resp.status = falcon.HTTP_200 if ok else falcon.HTTP_503


class Metrics:
    def on_get(self, req, resp) -> None:
        resp.data = generate_latest(metrics.REGISTRY)
        resp.content_type = CONTENT_TYPE_LATEST


class OpenApi:
    def on_get(self, req, resp) -> None:
        resp.media = openapi.DOCUMENT


class QueueStats:
    def __init__(self, queue: service.QueueService):
        self.queue = queue

    def on_get(self, req, resp) -> None:
        read_query(req, ())
        resp.media = self.queue.stats()


class QueueMessages:
    FILTERS = ("status", "sender", "recipient")

    def __init__(self, queue: service.QueueService):
        self.queue = queue

    def on_get(self, req, resp) -> None:
        params = read_query(req, PAGING + self.FILTERS)
        resp.media = self.queue.messages(**paging(params), **{k: params.get(k) for k in self.FILTERS})


class QueueMessage:
    def __init__(self, queue: service.QueueService):
        self.queue = queue

    def on_get(self, req, resp, id: str) -> None:
        read_query(req, ())
        resp.media = self.queue.message(id)

    def on_delete(self, req, resp, id: str) -> None:
        read_query(req, ())
        self.queue.delete(id)
        resp.status = falcon.HTTP_204


class QueueAction:
    """POST .../retry, /hold, /release: an empty body or {}."""

    def __init__(self, queue: service.QueueService, action: str):
        self.queue = queue
        self.action = action

    def on_post(self, req, resp, id: str) -> None:
        read_query(req, ())
        read_json(req, {}, optional=True)
        resp.media = getattr(self.queue, self.action)(id)


class QueueFlush:
    def __init__(self, queue: service.QueueService):
        self.queue = queue

    def on_post(self, req, resp) -> None:
        read_query(req, ())
        read_json(req, {}, optional=True)
        resp.media = self.queue.flush()


class Users:
    def __init__(self, users: service.UserService):
        self.users = users

    def on_get(self, req, resp) -> None:
        resp.media = self.users.list(**paging(read_query(req, PAGING)))

    def on_post(self, req, resp) -> None:
        read_query(req, ())
        body = read_json(req, {"username": str, "password": str})
        user = self.users.add(body["username"], body["password"])
        resp.status = falcon.HTTP_201
        resp.location = f"/api/auth/users/{quote(user['username'], safe='@')}"
        resp.media = user


class User:
    def __init__(self, users: service.UserService):
        self.users = users

    def on_get(self, req, resp, username: str) -> None:
        read_query(req, ())
        resp.media = self.users.get(username)

    def on_put(self, req, resp, username: str) -> None:
        read_query(req, ())
        body = read_json(req, {"password": str})
        resp.media = self.users.set_password(username, body["password"])

    def on_delete(self, req, resp, username: str) -> None:
        read_query(req, ())
        self.users.delete(username)
        resp.status = falcon.HTTP_204


class PolicyList:
    """GET/POST /api/policy/{blacklist|whitelist}/{ip|sender|domain}."""

    def __init__(self, policy: service.PolicyService, name: str, field: str):
        self.policy, self.name, self.field = policy, name, field

    def on_get(self, req, resp) -> None:
        resp.media = self.policy.entries(self.name, self.field, **paging(read_query(req, PAGING)))

    def on_post(self, req, resp) -> None:
        read_query(req, ())
        body = read_json(req, {self.field: str})
        entry = self.policy.add(self.name, self.field, body[self.field])
        resp.status = falcon.HTTP_201
        resp.location = f"/api/policy/{self.name}/{self.field}/{quote(entry[self.field], safe='@:')}"
        resp.media = entry


class PolicyEntry:
    """DELETE /api/policy/{list}/{field}/{value}; a CIDR's "/" is sent as %2F."""

    def __init__(self, policy: service.PolicyService, name: str, field: str):
        self.policy, self.name, self.field = policy, name, field

    def on_delete(self, req, resp, **params) -> None:
        read_query(req, ())
        self.policy.remove(self.name, self.field, params[self.field])
        resp.status = falcon.HTTP_204


class AbuseState:
    """GET /api/policy/ratelimits and /api/policy/greylist from `deps.abuse`."""

    def __init__(self, deps, kind: str):
        self.deps = deps
        self.kind = kind

    def on_get(self, req, resp) -> None:
        params = paging(read_query(req, PAGING))
        body = service.page(list(getattr(self.deps.abuse, self.kind)()), **params)
        if self.kind == "greylist":
            body["summary"] = self.deps.abuse.greylist_summary()
        resp.media = body


# --- the app ---

def create_app(deps) -> falcon.App:
    """The WSGI app; builds no shared objects, only wraps `deps`."""
    # Order matters: the token is checked before anything looks at the body.
    app = falcon.App(middleware=[ResponseHeaders(), RawPath(),
                                 BearerAuth(deps.token, lambda: bool(deps.config().admin_protect_metrics)),
                                 BodyLimit()])
    app.req_options.keep_blank_qs_values = True   # "?status=" is an invalid status, not no filter
    app.req_options.auto_parse_qs_csv = False
    app.set_error_serializer(serialize_error)
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(service.ServiceError, handle_service_error)

    queue = service.QueueService(deps.spool, deps.scheduler)
    users = service.UserService(deps.users)
    policy = service.PolicyService(deps.policy)

    app.add_route("/api/health", Health(deps))
    app.add_route("/api/metrics", Metrics())
    app.add_route("/api/openapi.json", OpenApi())
    app.add_route("/api/queue/stats", QueueStats(queue))
    app.add_route("/api/queue/messages", QueueMessages(queue))
    app.add_route("/api/queue/messages/{id}", QueueMessage(queue))
    for action in ("retry", "hold", "release"):
        app.add_route(f"/api/queue/messages/{{id}}/{action}", QueueAction(queue, action))
    app.add_route("/api/queue/flush", QueueFlush(queue))
    app.add_route("/api/auth/users", Users(users))
    app.add_route("/api/auth/users/{username}", User(users))
    for name in LISTS:
        for field in FIELDS:
            app.add_route(f"/api/policy/{name}/{field}", PolicyList(policy, name, field))
            app.add_route(f"/api/policy/{name}/{field}/{{{field}}}", PolicyEntry(policy, name, field))
    app.add_route("/api/policy/ratelimits", AbuseState(deps, "ratelimits"))
    app.add_route("/api/policy/greylist", AbuseState(deps, "greylist"))
    return app

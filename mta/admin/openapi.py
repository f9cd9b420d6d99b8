"""The OpenAPI 3.0 document of the admin API, served at /api/openapi.json.

Hand-written, so it says what the API promises rather than what a generator
guessed. It must list exactly the routes and methods `mta.admin.app`
registers (tests/unit/test_admin_app.py walks the Falcon router and
compares). The black/white list paths are the same six times over, so they
are written once and repeated for each list and field.
"""

from __future__ import annotations

import copy

from mta import __version__
from mta.policy.lists import FIELDS, LISTS

JSON = "application/json"


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _error(description: str) -> dict:
    return {"$ref": f"#/components/responses/{description}"}


def _list_of(item: dict) -> dict:
    return {"type": "object", "required": ["items", "total"],
            "properties": {"items": {"type": "array", "items": item},
                           "total": {"type": "integer", "minimum": 0,
                                     "description": "matching items before limit/offset"}}}


def _body(schema: dict, required: bool = True) -> dict:
    return {"required": required, "content": {JSON: {"schema": schema}}}


PAGING = [
    {"name": "limit", "in": "query", "required": False,
     "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}},
    {"name": "offset", "in": "query", "required": False,
     "schema": {"type": "integer", "minimum": 0, "default": 0}},
]
QUEUE_ID = {"name": "id", "in": "path", "required": True, "description": "queue id (20 hex digits)",
            "schema": {"type": "string", "pattern": "^[0-9A-F]{20}$"}}
USERNAME = {"name": "username", "in": "path", "required": True,
            "description": "full address, e.g. alice@example.com", "schema": {"type": "string"}}
OPEN = []       # security requirement list of the routes that need no token
EMPTY_BODY = _body({"type": "object", "additionalProperties": False, "maxProperties": 0}, required=False)

SCHEMAS = {
    "Error": {
        "type": "object", "required": ["error", "detail"],
        "properties": {
            "error": {"type": "string", "description": "short code: bad_request, unauthorized, not_found, "
                      "method_not_allowed, conflict, payload_too_large, unsupported_media_type, "
                      "invalid, internal_error, unavailable"},
            "detail": {"description": "human-readable explanation (usually a string)"},
        },
    },
    "Recipient": {
        "type": "object", "required": ["address", "status", "attempts", "last_error"],
        "properties": {
            "address": {"type": "string"},
            "status": {"type": "string", "enum": ["pending", "deferred", "delivered", "bounced"]},
            "attempts": {"type": "integer"},
            "last_error": {"type": "string", "nullable": True},
        },
    },
    "MessageSummary": {
        "type": "object", "required": ["id", "status", "size", "arrival", "sender", "recipients"],
        "properties": {
            "id": {"type": "string"},
            "status": {"type": "string", "enum": ["active", "deferred", "hold", "bounce"]},
            "size": {"type": "integer", "description": "octets as the client sent them"},
            "arrival": {"type": "string", "format": "date-time"},
            "sender": {"type": "string", "description": "\"\" is the null reverse-path <>"},
            "recipients": {"type": "array", "items": _ref("Recipient")},
            "next_attempt": {"type": "string", "format": "date-time", "nullable": True},
        },
    },
    "Message": {
        "allOf": [_ref("MessageSummary"), {
            "type": "object", "required": ["headers"],
            "properties": {"headers": {
                "type": "array",
                "description": "the stored header section in order, unfolded, as [name, value] pairs "
                               "(a list, so repeated fields like Received keep their order)",
                "items": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2},
            }},
        }],
    },
    "MessageState": {
        "type": "object", "required": ["id", "status"],
        "properties": {"id": {"type": "string"},
                       "status": {"type": "string", "enum": ["active", "hold"]}},
    },
    "QueueStats": {
        "type": "object", "required": ["by_status", "bytes", "oldest_age_seconds"],
        "properties": {
            "by_status": {"type": "object", "required": ["active", "deferred", "hold", "bounce"],
                          "additionalProperties": {"type": "integer"}},
            "bytes": {"type": "integer"},
            "oldest_age_seconds": {"type": "integer"},
        },
    },
    "Flush": {"type": "object", "required": ["flushed"],
              "properties": {"flushed": {"type": "integer", "description": "deferred messages made due now"}}},
    "Health": {
        "type": "object", "required": ["status", "listeners", "spool", "queue", "delivery"],
        "properties": {
            "status": {"type": "string", "enum": ["ok", "unavailable"]},
            "reason": {"type": "string", "description": "why it is unavailable (only then)"},
            "listeners": {"type": "array", "items": {
                "type": "object", "required": ["mode", "address", "port", "up"],
                "properties": {"mode": {"type": "string", "enum": ["relay", "submission", "submissions"]},
                               "address": {"type": "string"}, "port": {"type": "integer"},
                               "up": {"type": "boolean"}}}},
            "spool": {"type": "object", "required": ["writable", "free_bytes"],
                      "properties": {"writable": {"type": "boolean"}, "free_bytes": {"type": "integer"}}},
            "queue": {"type": "object", "required": ["depth"], "properties": {"depth": {"type": "integer"}}},
            "delivery": {"type": "object", "required": ["workers", "paused"],
                         "properties": {"workers": {"type": "integer"}, "paused": {"type": "boolean"},
                                        "active": {"type": "integer", "description": "deliveries in progress"}}},
            "smtp": {"type": "object", "properties": {"sessions": {"type": "integer"}}},
        },
    },
    "User": {
        "type": "object", "required": ["username", "created"],
        "description": "never includes the password hash",
        "properties": {"username": {"type": "string"},
                       "created": {"type": "string", "format": "date-time", "nullable": True},
                       "changed": {"type": "string", "format": "date-time", "nullable": True}},
    },
    "NewUser": {
        "type": "object", "required": ["username", "password"], "additionalProperties": False,
        "properties": {"username": {"type": "string", "description": "full address"},
                       "password": {"type": "string", "minLength": 1,
                                    "description": "one line, no NUL, at most 1024 bytes"}},
    },
    "Password": {
        "type": "object", "required": ["password"], "additionalProperties": False,
        "properties": {"password": {"type": "string", "minLength": 1}},
    },
    "RateLimitBucket": {
        "type": "object", "required": ["kind", "key", "limit_per_hour", "tokens"],
        "description": "a token bucket that is not full (N per hour, refilled over the hour); full ones are not kept",
        "properties": {"kind": {"type": "string", "enum": ["ip", "user", "domain"]},
                       "key": {"type": "string", "description": "the client IP, user or sender domain"},
                       "limit_per_hour": {"type": "integer"},
                       "tokens": {"type": "number", "description": "messages left before 450 4.7.1"}},
    },
    "GreylistEntry": {
        "type": "object", "required": ["key", "first_seen", "last_seen", "passed"],
        "description": "one (client network, sender, recipient) triplet, stored hashed",
        "properties": {"key": {"type": "string"},
                       "first_seen": {"type": "string", "format": "date-time", "nullable": True},
                       "last_seen": {"type": "string", "format": "date-time", "nullable": True},
                       "retry_after": {"type": "string", "format": "date-time", "nullable": True,
                                       "description": "when a pending triplet may pass; null once passed"},
                       "passed": {"type": "boolean"}},
    },
    "GreylistSummary": {
        "type": "object",
        "properties": {"enabled": {"type": "boolean"}, "delay_seconds": {"type": "integer"},
                       "triplets": {"type": "integer"}, "passed": {"type": "integer"},
                       "pending": {"type": "integer"}, "oldest_pending_age_seconds": {"type": "integer"}},
    },
}

FIELD_TEXT = {
    "ip": ("an IPv4/IPv6 address or CIDR network (stored normalised: 10.1.2.3/8 becomes 10.0.0.0/8)",
           "127.0.0.0%2F8"),
    "sender": ("a full sender address (case-insensitive)", "spammer@example.org"),
    "domain": ("a sender domain; also matches its subdomains", "example.org"),
}

RESPONSES = {
    "BadRequest": _json(_ref("Error"), "malformed JSON, wrong types, unknown or missing fields, "
                                       "unknown query parameters"),
    "Unauthorized": {"description": "missing or wrong bearer token; carries WWW-Authenticate: Bearer",
                     "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
                     "content": {JSON: {"schema": _ref("Error")}}},
    "NotFound": _json(_ref("Error"), "no such message, user or entry"),
    "Conflict": _json(_ref("Error"), "the current state does not allow it (exists, not on hold, busy)"),
    "PayloadTooLarge": _json(_ref("Error"), "request body over 64 KiB"),
    "UnsupportedMediaType": _json(_ref("Error"), "a body that is not application/json"),
    "Invalid": _json(_ref("Error"), "well-formed but invalid value (address, IP/CIDR, status filter, range)"),
    "Unavailable": _json(_ref("Error"), "storage error (spool or data directory)"),
}


def _op(summary: str, responses: dict, *, params=None, body=None, security=None, tags=None) -> dict:
    operation = {"summary": summary, "responses": {
        **responses,
        "400": _error("BadRequest"),
        **({} if security is OPEN else {"401": _error("Unauthorized")}),
    }}
    if params:
        operation["parameters"] = params
    if body:
        operation["requestBody"] = body
        operation["responses"]["413"] = _error("PayloadTooLarge")
        operation["responses"]["415"] = _error("UnsupportedMediaType")
    if security is not None:
        operation["security"] = security
    if tags:
        operation["tags"] = tags
    return operation


PATHS = {
    "/api/health": {"get": _op(
        "Liveness and readiness: listeners up, spool writable, queue depth, delivery workers",
        {"200": _json(_ref("Health"), "all is well"),
         "503": _json(_ref("Health"), "not ready: status is \"unavailable\" and reason says why")},
        security=OPEN, tags=["health"])},
    "/api/metrics": {"get": _op(
        "Prometheus metrics (text format 0.0.4); needs the token only with admin_protect_metrics",
        {"200": {"description": "metrics", "content": {"text/plain; version=0.0.4; charset=utf-8":
                                                        {"schema": {"type": "string"}}}}},
        security=[{}, {"bearerAuth": []}], tags=["health"])},
    "/api/openapi.json": {"get": _op(
        "This document", {"200": _json({"type": "object"}, "OpenAPI 3.0 document")},
        security=OPEN, tags=["health"])},
    "/api/queue/stats": {"get": _op(
        "Counts by status, bytes, oldest message age",
        {"200": _json(_ref("QueueStats"), "queue statistics"), "503": _error("Unavailable")}, tags=["queue"])},
    "/api/queue/messages": {"get": _op(
        "List queued messages, oldest first",
        {"200": _json(_list_of(_ref("MessageSummary")), "matching messages"),
         "422": _error("Invalid"), "503": _error("Unavailable")},
        params=PAGING + [
            {"name": "status", "in": "query", "required": False,
             "schema": {"type": "string", "enum": ["active", "deferred", "hold", "bounce"]}},
            {"name": "sender", "in": "query", "required": False, "schema": {"type": "string"},
             "description": "exact address (case-insensitive), @domain for a whole domain, <> for the null sender"},
            {"name": "recipient", "in": "query", "required": False, "schema": {"type": "string"},
             "description": "a message matches when any recipient matches: exact address or @domain"},
        ], tags=["queue"])},
    "/api/queue/messages/{id}": {
        "get": _op("One message: envelope, per-recipient state, headers",
                   {"200": _json(_ref("Message"), "the message"), "404": _error("NotFound"),
                    "409": _error("Conflict")}, params=[QUEUE_ID], tags=["queue"]),
        "delete": _op("Delete a message (postsuper -d)",
                      {"204": {"description": "deleted"}, "404": _error("NotFound"),
                       "409": _error("Conflict")}, params=[QUEUE_ID], tags=["queue"]),
    },
    "/api/queue/messages/{id}/retry": {"post": _op(
        "Make a deferred message due now (postqueue -i); takes effect at once",
        {"200": _json(_ref("MessageState"), "scheduled"), "404": _error("NotFound"),
         "409": _error("Conflict")}, params=[QUEUE_ID], body=EMPTY_BODY, tags=["queue"])},
    "/api/queue/messages/{id}/hold": {"post": _op(
        "Put a message on hold (postsuper -h); holding a held message is not an error",
        {"200": _json(_ref("MessageState"), "held"), "404": _error("NotFound"),
         "409": _error("Conflict")}, params=[QUEUE_ID], body=EMPTY_BODY, tags=["queue"])},
    "/api/queue/messages/{id}/release": {"post": _op(
        "Release a held message (postsuper -H); 409 when it is not on hold",
        {"200": _json(_ref("MessageState"), "released and due now"), "404": _error("NotFound"),
         "409": _error("Conflict")}, params=[QUEUE_ID], body=EMPTY_BODY, tags=["queue"])},
    "/api/queue/flush": {"post": _op(
        "Make every deferred message due now (postqueue -f)",
        {"200": _json(_ref("Flush"), "count of messages scheduled"), "503": _error("Unavailable")},
        body=EMPTY_BODY, tags=["queue"])},
    "/api/auth/users": {
        "get": _op("List SMTP AUTH users", {"200": _json(_list_of(_ref("User")), "users"), "422": _error("Invalid")},
                   params=PAGING, tags=["users"]),
        "post": _op("Add a user; takes effect for the next AUTH",
                    {"201": {**_json(_ref("User"), "created"),
                             "headers": {"Location": {"schema": {"type": "string"}}}},
                     "409": _error("Conflict"), "422": _error("Invalid")},
                    body=_body(_ref("NewUser")), tags=["users"]),
    },
    "/api/auth/users/{username}": {
        "get": _op("One user", {"200": _json(_ref("User"), "the user"), "404": _error("NotFound")},
                   params=[USERNAME], tags=["users"]),
        "put": _op("Change the password", {"200": _json(_ref("User"), "changed"), "404": _error("NotFound"),
                                            "422": _error("Invalid")},
                   params=[USERNAME], body=_body(_ref("Password")), tags=["users"]),
        "delete": _op("Delete a user", {"204": {"description": "deleted"}, "404": _error("NotFound")},
                      params=[USERNAME], tags=["users"]),
    },
    "/api/policy/ratelimits": {"get": _op(
        "Rate-limit buckets that are not full (per client IP, user, sender domain)",
        {"200": _json(_list_of(_ref("RateLimitBucket")), "buckets"), "422": _error("Invalid")},
        params=PAGING, tags=["policy"])},
    "/api/policy/greylist": {"get": _op(
        "Greylisting state: the triplets (paged) and a summary",
        {"200": _json({"allOf": [_list_of(_ref("GreylistEntry")), {
            "type": "object", "properties": {"summary": _ref("GreylistSummary")}}]}, "triplets and summary"),
         "422": _error("Invalid")},
        params=PAGING, tags=["policy"])},
}

for _name in LISTS:
    for _field in FIELDS:
        _text, _example = FIELD_TEXT[_field]
        _entry = {"type": "object", "required": [_field], "additionalProperties": False,
                  "properties": {_field: {"type": "string", "description": _text}}}
        PATHS[f"/api/policy/{_name}/{_field}"] = {
            "get": _op(f"Entries of the {_name} by {_field}",
                       {"200": _json(_list_of({"type": "string", "description": _text}), "entries (normalised)"),
                        "422": _error("Invalid")}, params=PAGING, tags=["policy"]),
            "post": _op(f"Add {_text} to the {_name}; takes effect on the next MAIL",
                        {"201": {**_json(copy.deepcopy(_entry), "added (value normalised)"),
                                 "headers": {"Location": {"schema": {"type": "string"}}}},
                         "409": _error("Conflict"), "422": _error("Invalid")},
                        body=_body(copy.deepcopy(_entry)), tags=["policy"]),
        }
        PATHS[f"/api/policy/{_name}/{_field}/{{{_field}}}"] = {
            "delete": _op(f"Remove an entry from the {_name} by {_field}",
                          {"204": {"description": "removed"}, "404": _error("NotFound")},
                          params=[{"name": _field, "in": "path", "required": True, "example": _example,
                                   "description": _text + "; percent-encode '/' as %2F",
                                   "schema": {"type": "string"}}], tags=["policy"]),
        }

DOCUMENT = {
    "openapi": "3.0.3",
    "info": {
        "title": "mta admin API",
        "version": __version__,
        "description": "Operate the mta mail transfer agent: queue, SMTP AUTH users, black/white lists, "
                       "health and metrics. JSON in and out; every error is "
                       "{\"error\": \"...\", \"detail\": ...}. Bodies over 64 KiB get 413.",
    },
    "servers": [{"url": "/"}],
    "security": [{"bearerAuth": []}],
    "tags": [{"name": name} for name in ("health", "queue", "users", "policy")],
    "paths": PATHS,
    "components": {
        "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer",
                                           "description": "MTA_ADMIN_TOKEN, or the token in DATA_DIR/admin.token"}},
        "schemas": SCHEMAS,
        "responses": RESPONSES,
    },
}

"""The admin REST API: Falcon resources on Waitress threads inside the daemon.

    deps.py      what the API needs from the daemon (`AdminDeps`), passed in
    service.py   the operations and queries, shared with any other front end
    app.py       `create_app(deps)`: routes, bearer auth, JSON in and out
    openapi.py   the OpenAPI 3 document served at /api/openapi.json
    serve.py     Waitress in its own thread; bound at start-up, closed on stop

Handlers are thin: they parse HTTP, call the service layer and shape the
answer. Only the service layer talks to the spool, users and policy stores,
and it does so through the same methods `mta queue` and `mta user` use.
"""

"""``delivery api``: the authenticated, multi-tenant HTTP API (aiohttp + pydantic v2).

One declarative route table (``routes.ROUTES``: method, path, scope, models per status) is what
the server serves, what validates requests, and what ``openapi.document`` describes, so the
OpenAPI document cannot drift from the server. Modules:

- ``routing``: the ``Route`` record, the ``Call`` a handler gets and the ``Reply`` it returns;
- ``routes``: the table; ``events``, ``subscriptions``, ``dead_letters``: one module per
  resource group (handlers); ``models``: the request and response bodies;
- ``app``: the aiohttp application, its middlewares (errors, metrics, access log) and the
  adapter from a ``Route`` to an aiohttp handler; ``auth``: bearer keys and scopes;
- ``problems``: every error as ``{"error": {"code", "message", "field"}}``;
- ``pagination``: opaque keyset cursors; ``openapi``: the document; ``server``: the process.
"""

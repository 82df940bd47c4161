"""``/ui/``: the web page's static files (``delivery/api/ui/``), read once at start-up and
served from memory. Nothing on the page comes from elsewhere: the Content-Security-Policy
allows this origin only, so a stray external reference fails loudly in the browser tests."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

_DIR = Path(__file__).resolve().parent / "ui"
_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
}
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none';"
        " form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Small files, and a release changes them: always revalidate rather than serve stale code.
    "Cache-Control": "no-cache",
}


def _load() -> dict[str, tuple[bytes, str]]:
    files = {}
    for path in sorted(_DIR.iterdir()):
        if path.suffix in _TYPES:
            files[path.name] = (path.read_bytes(), _TYPES[path.suffix])
    return files


def add_webpage(app: web.Application) -> None:
    files = _load()

    async def serve(request: web.Request) -> web.Response:
        name = request.match_info.get("name") or "index.html"
        found = files.get(name)
        if found is None:
            raise web.HTTPNotFound()
        body, content_type = found
        return web.Response(body=body, content_type=content_type, charset="utf-8", headers=_HEADERS)

    async def to_slash(_request: web.Request) -> web.Response:
        # Returned, not raised: the API's middleware turns raised HTTP errors into JSON.
        return web.Response(status=302, headers={"Location": "/ui/"})

    app.router.add_get("/ui", to_slash, allow_head=False)
    app.router.add_get("/ui/", serve)
    app.router.add_get("/ui/{name}", serve)

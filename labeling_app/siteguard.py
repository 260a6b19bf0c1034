"""Cross-site requests refused, request limits, and the security headers every response carries.

Gradio answers any `Origin` with `Access-Control-Allow-Credentials: true` unless the app it is
mounted in configures CORS itself (its `CustomCORSMiddleware` steps aside then), so a page on
another site could read `/gradio_api/token` with an annotator's cookie and vote as them. Two
layers stop that, on the outer FastAPI app that holds both the Gradio mount and the vote routes:

- `SiteGuard` (outermost): a request whose `Origin` is neither this server's own host (as the
  request names it: `Host`, or `X-Forwarded-Host` behind a proxy) nor on the allow-list gets 403
  before anything reads it, whatever its method: browsers send `Origin` on cross-origin fetches
  and on every POST, never on a plain navigation, so same-site pages, `gradio_client`, `curl`
  and the JSON clients (which send no `Origin`) are untouched. A request with no `Origin` whose
  `Sec-Fetch-Site` says `cross-site` is refused when its method changes something (a form POST
  from an old browser). A link from another site still opens the page (a GET navigation).
- Starlette's `CORSMiddleware` with an explicit allow-list (empty by default; `align label serve
  --allow-origin URL` adds one): only listed origins get `Access-Control-Allow-Origin`.

Limits, before any route reads a byte: a body over `MAX_BODY` (64 KB; a vote is a few hundred bytes) gets 413,
from its `Content-Length` or, for a chunked body, as soon as it grows past the limit. Which routes a request may
reach at all (uploads: none, the app has no file input) is `access.py`'s allow-list, behind this.

Every response also carries `Content-Security-Policy: frame-ancestors 'none'` and `X-Frame-Options:
DENY` (no framing: clickjacking), `X-Content-Type-Options: nosniff` and `Referrer-Policy: same-origin`.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders

UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
MAX_BODY = 64 * 1024
SECURITY_HEADERS = {
    "Content-Security-Policy": "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


def normalize_origin(origin: str) -> str:
    """`scheme://host[:port]`, lower case, default ports dropped; '' for what is not an origin ("null", a port that
    is not a number from 0 to 65535, an unclosed IPv6 bracket: urlsplit raises on those), which is then refused."""
    try:
        parts = urlsplit(origin.strip().lower())
        port_number = parts.port
    except ValueError:
        return ""
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return ""
    default = {"http": 80, "https": 443}[parts.scheme]
    port = f":{port_number}" if port_number and port_number != default else ""
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname  # IPv6, as a Host header writes it
    return f"{parts.scheme}://{host}{port}"


def _host_of(origin: str) -> str:
    """`host[:port]` of a normalized origin, with the default port dropped, as a `Host` header writes it."""
    return origin.split("://", 1)[1] if origin else ""


def _request_hosts(headers: Headers) -> set[str]:
    """The names this request gives the server: `Host`, and `X-Forwarded-Host` set by a proxy in front."""
    names = {headers.get("host", "")}
    names.update(h.strip() for h in headers.get("x-forwarded-host", "").split(","))
    out = set()
    for name in filter(None, (n.strip().lower() for n in names)):
        host, colon, port = name.rpartition(":")
        if not colon or "]" in port:  # no port ("example.com", "[::1]")
            host, port = name, ""
        out.add(host if port in ("", "80", "443") else name)
    return out


def is_foreign(headers: Headers, method: str, allowed: frozenset[str]) -> bool:
    """Whether a request comes from another site: see the module's docstring."""
    origin = headers.get("origin")
    if origin is not None:
        normalized = normalize_origin(origin)
        return not normalized or (normalized not in allowed and _host_of(normalized) not in _request_hosts(headers))
    return headers.get("sec-fetch-site") == "cross-site" and method in UNSAFE_METHODS


class SiteGuard:
    """ASGI middleware: 403 for cross-site requests, security headers on every response."""

    def __init__(self, app, allow_origins: tuple[str, ...] = (), max_body: int = MAX_BODY):
        self.app = app
        self.allowed = frozenset(filter(None, map(normalize_origin, allow_origins)))
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if is_foreign(headers, scope.get("method", "GET"), self.allowed):
            await self.refuse(scope, send)
            return
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            await self.refuse(scope, send, 413, f"request body over {self.max_body} bytes")
            return
        if declared is None and scope.get("method") in UNSAFE_METHODS:
            receive = await self.buffered(receive)
            if receive is None:
                await self.refuse(scope, send, 413, f"request body over {self.max_body} bytes")
                return

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                response_headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    response_headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def buffered(self, receive):
        """A body sent without a length (chunked), read up to the limit: a `receive` that replays it, or None
        once it grows past the limit."""
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_body:
                return None
            if not message.get("more_body"):
                break
        replay = iter(messages)

        async def replayed():
            return next(replay, None) or await receive()

        return replayed

    @staticmethod
    async def refuse(scope, send, status: int = 403, why: str = "cross-site request refused") -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"error": why}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *((k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items())]})
        await send({"type": "http.response.body", "body": body})

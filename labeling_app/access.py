"""Who may use what: one allow-list for every route the server has, the app's and all that Gradio registers.

Three roles: no session, an annotator (any live session: admins are annotators too) and an admin. `ROUTES` gives,
for each (method, path template) the router knows, the least role that may use it, or NOBODY. `Access`, an ASGI
middleware in front of every route, finds the entries a request matches (the strictest one wins when several do)
and refuses what the table does not allow: 401 without a session, 403 with one. A request matching no entry (a
path no route has, a method a route does not take) is refused the same way, and so is a route Gradio adds in a
later version until it is classified here: `tests/test_label_access.py` walks the real app's router and fails on a
route this table does not name. `GET /` without a session is the one exception: it goes to the login form (303).

Gradio's endpoint routes (`run`, `queue/join`, `call`) name an event by api name or index; `ENDPOINTS` lists the
events the app has, the role each needs and the type of each argument, checked before Gradio sees the call (422
for a wrong one; Gradio itself turns a handler's exception on `run` into a 500). Results: Gradio hands an event's
output to whoever presents its event id (`call/<api>/<event_id>`) or its session hash (`queue/data`); here they go
only to the session that started the event: a session hash belongs to the session (the `align-session` cookie)
that first sent it, an event id to the session whose request created it, and anyone else gets 404.

Files: the file route serves what handlers return, which here is only an admin's export (the annotator page has
none); an export downloaded whole (200 to a GET) is deleted at once, ours and Gradio's cached copy, and any file
request first deletes exports over an hour old (`LabelingApp.sweep_exports`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable
from urllib.parse import parse_qs, unquote

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse
from starlette.routing import compile_path

from labeling_app import export, gradio_internals, sessions
from labeling_app.store import CHOICES

PUBLIC, USER, ADMIN, NOBODY = "no session", "annotator", "admin", "nobody"
_STRICTNESS = {PUBLIC: 0, USER: 1, ADMIN: 2, NOBODY: 3}


def _both(method: str, path: str, role: str) -> dict:
    """A route Gradio registers with and without a trailing slash."""
    return {(method, path): role, (method, path + "/"): role}


ROUTES: dict[tuple[str, str], str] = {
    # The app's own (sessions.py, app.py). Logging out needs no live session (an expired one still clears its cookie).
    **_both("GET", "/login", PUBLIC), **_both("POST", "/login", PUBLIC),
    **_both("GET", "/logout", PUBLIC), **_both("POST", "/logout", PUBLIC),
    ("POST", "/label/api/vote"): USER,
    ("POST", "/label/api/undo"): USER,
    # Gradio's frontend files: the same in every Gradio install (scripts, styles, icons), nothing of ours.
    ("GET", "/assets/{path:path}"): PUBLIC,
    ("GET", "/static/{path:path}"): PUBLIC,
    ("GET", "/svelte/{path:path}"): PUBLIC,
    ("GET", "/favicon.ico"): PUBLIC,
    ("GET", "/robots.txt"): PUBLIC,
    ("GET", "/theme.css"): PUBLIC,
    ("GET", "/gradio_api/theme.css"): PUBLIC,
    ("GET", "/manifest.json"): PUBLIC,
    ("GET", "/pwa_icon"): PUBLIC,
    ("GET", "/pwa_icon/{size}"): PUBLIC,
    # The page, and what it and gradio_client read to call the endpoints.
    ("GET", "/"): USER,
    ("HEAD", "/"): USER,
    **_both("GET", "/config", USER),
    **_both("GET", "/gradio_api/info", USER),
    # Calling an endpoint (ENDPOINTS says which, for whom, with what) and reading one's own results.
    **_both("POST", "/gradio_api/run/{api_name}", USER),
    ("POST", "/gradio_api/queue/join"): USER,
    ("GET", "/gradio_api/queue/data"): USER,
    **_both("POST", "/gradio_api/call/{api_name}", USER),
    ("GET", "/gradio_api/call/{api_name}/{event_id}"): USER,
    # Files: only exports are ever served.
    ("GET", "/gradio_api/file={path_or_url:path}"): ADMIN,
    ("HEAD", "/gradio_api/file={path_or_url:path}"): ADMIN,
    # Everything else Gradio registers, for nobody: what the app does not use, or does through the routes above.
    ("GET", "/openapi.json"): NOBODY,  # the route list itself
    ("HEAD", "/openapi.json"): NOBODY,
    ("GET", "/gradio_api/openapi.json"): NOBODY,
    ("GET", "/gradio_api/file/{path:path}"): NOBODY,  # the older file route (served exports without deleting them)
    ("GET", "/gradio_api/heartbeat/{session_hash}"): NOBODY,  # no State, no unload event: config says no heartbeat
    **_both("POST", "/gradio_api/api/{api_name}", NOBODY),  # the older name of run/
    **_both("POST", "/gradio_api/call/v2/{api_name}", NOBODY),  # call/ with keyword arguments
    ("GET", "/gradio_api/call/v2/{api_name}/{event_id}"): NOBODY,
    ("POST", "/gradio_api/cancel"): NOBODY,  # no event of the app can be cancelled
    **_both("POST", "/gradio_api/reset", NOBODY),
    ("GET", "/gradio_api/queue/status"): NOBODY,
    ("POST", "/gradio_api/upload"): NOBODY,  # the app takes no files (siteguard.py refuses it first)
    ("GET", "/gradio_api/upload_progress"): NOBODY,
    **_both("POST", "/gradio_api/component_server", NOBODY),
    ("GET", "/gradio_api/startup-events"): NOBODY,
    ("GET", "/gradio_api/deep_link"): NOBODY,
    **_both("GET", "/gradio_api/user", NOBODY),  # who is logged in: the page shows it from the load event
    **_both("GET", "/gradio_api/login_check", NOBODY),
    **_both("GET", "/gradio_api/token", NOBODY),  # Gradio's own login token; sessions are the app's
    **_both("GET", "/gradio_api/app_id", NOBODY),
    ("GET", "/gradio_api/dev/reload"): NOBODY,
    ("GET", "/gradio_api/proxy={url_path:path}"): NOBODY,  # fetches other Gradio apps' files
    ("HEAD", "/gradio_api/proxy={url_path:path}"): NOBODY,
    ("GET", "/gradio_api/custom_component/{id}/{environment}/{type}/{file_name}"): NOBODY,
    ("POST", "/gradio_api/stream/{event_id}"): NOBODY,  # streaming media in and out: the app has none
    ("POST", "/gradio_api/stream/{event_id}/close"): NOBODY,
    ("GET", "/gradio_api/stream/{session_hash}/{run}/{component_id}/playlist.m3u8"): NOBODY,
    ("GET", "/gradio_api/stream/{session_hash}/{run}/{component_id}/{segment_id}.{ext}"): NOBODY,
    ("GET", "/gradio_api/stream/{session_hash}/{run}/{component_id}/playlist-file"): NOBODY,
    ("POST", "/gradio_api/process_recording"): NOBODY,
    **_both("GET", "/gradio_api/runs", NOBODY),  # Gradio's run history: the app keeps its own records
    ("POST", "/gradio_api/run-history/connect"): NOBODY,
    ("GET", "/gradio_api/run-history/buckets"): NOBODY,
    ("GET", "/gradio_api/run-history/records"): NOBODY,
    ("GET", "/gradio_api/run-history/records/{endpoint}/{record_id}/assets/{asset_id}"): NOBODY,
    ("GET", "/monitoring"): NOBODY,
    ("GET", "/monitoring/summary"): NOBODY,
    ("GET", "/monitoring/{key}"): NOBODY,
    **_both("POST", "/gradio_api/vibe-edit", NOBODY),  # Gradio's AI editor
    **_both("POST", "/gradio_api/undo-vibe-edit", NOBODY),
    **_both("GET", "/gradio_api/vibe-code", NOBODY),
    **_both("POST", "/gradio_api/vibe-code", NOBODY),
    **_both("POST", "/gradio_api/vibe-starter-queries", NOBODY),
}

# Routes whose requests carry more than a role decides: which endpoint, whose results, which file.
ENDPOINT_CALLS = {"/gradio_api/run/{api_name}", "/gradio_api/run/{api_name}/", "/gradio_api/queue/join",
                  "/gradio_api/call/{api_name}", "/gradio_api/call/{api_name}/"}
STARTS_EVENTS = {"/gradio_api/queue/join", "/gradio_api/call/{api_name}", "/gradio_api/call/{api_name}/"}
RESULTS_BY_HASH = "/gradio_api/queue/data"
RESULTS_BY_EVENT = "/gradio_api/call/{api_name}/{event_id}"
FILES = "/gradio_api/file={path_or_url:path}"


# -- the app's Gradio events: the role each needs and what each argument must be

def text(value: Any) -> str | None:
    return None if isinstance(value, str) else "expected text"


def number(value: Any) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return None if ok else "expected a number"


def one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if isinstance(value, str) and value in choices else f"expected one of {', '.join(choices)}"

    return check


@dataclass(frozen=True)
class Endpoint:
    role: str
    args: tuple[tuple[str, Callable[[Any], str | None]], ...] = ()


# Kept equal to the api names app.py registers (LabelingApp.server checks it at start).
ENDPOINTS = {
    "load": Endpoint(USER),
    "vote": Endpoint(USER, (("presentation_id", text), ("choice", one_of(*CHOICES)), ("reason", text))),
    "undo": Endpoint(USER, (("vote_id", text),)),
    "admin_report": Endpoint(ADMIN),
    "export": Endpoint(ADMIN, (("kind", one_of(*export.KINDS)), ("min_votes", number), ("min_agreement", number))),
}


class Rules:
    """`ROUTES` compiled: the role a request needs, and the path parameters of the entries it matched."""

    def __init__(self, routes: dict[tuple[str, str], str] = ROUTES):
        self.exact: dict[str, list[tuple[str, str, str]]] = {}
        self.patterns: list[tuple[re.Pattern, str, str, str]] = []
        for (method, template), role in routes.items():
            regex, _, _ = compile_path(template)
            if "{" in template:
                self.patterns.append((regex, method, template, role))
            else:
                self.exact.setdefault(template, []).append((method, template, role))

    def match(self, method: str, path: str) -> tuple[str, dict[str, tuple[str, dict]]]:
        """(the strictest role among the entries matching, {template: params} of those entries); NOBODY when
        none matches."""
        found = {template: (role, {}) for m, template, role in self.exact.get(path, ()) if m == method}
        for regex, m, template, role in self.patterns:
            if m == method and (hit := regex.match(path)):
                found[template] = (role, hit.groupdict())
        if not found:
            return NOBODY, {}
        role = max((r for r, _ in found.values()), key=_STRICTNESS.__getitem__)
        return role, {template: params for template, (_, params) in found.items()}


class Owners:
    """Which session (a hash of its cookie) owns each Gradio session hash and event id; the oldest are forgotten
    past `keep` (their events are long over)."""

    def __init__(self, keep: int = 100_000):
        self.keep = keep
        self.hashes: OrderedDict[str, str] = OrderedDict()
        self.events: OrderedDict[str, str] = OrderedDict()

    def _put(self, table: OrderedDict, key: str, owner: str) -> None:
        table[key] = owner
        table.move_to_end(key)
        while len(table) > self.keep:
            table.popitem(last=False)

    def claim_hash(self, session_hash: str, owner: str) -> bool:
        """Bind a session hash to its first sender; False when another session holds it."""
        held = self.hashes.get(session_hash)
        if held is not None and held != owner:
            return False
        self._put(self.hashes, session_hash, owner)
        return True

    def started(self, event_id: str, owner: str) -> None:
        # An event started without a session hash runs under its own id as one (Gradio's Event), so queue/data
        # with that id reads it: the id is bound as a hash too.
        self._put(self.events, event_id, owner)
        self.claim_hash(event_id, owner)


def refusal(status: int, why: str) -> JSONResponse:
    return JSONResponse({"error": why}, status_code=status)


class Access:
    """ASGI middleware enforcing `ROUTES` and `ENDPOINTS` (see the module's docstring)."""

    def __init__(self, app, labeling, rules: Rules | None = None):
        self.app, self.labeling = app, labeling
        self.rules = rules or Rules()
        self.owners = Owners()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":  # the app has no websocket route
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        role, matched = self.rules.match(method, path)
        if role == PUBLIC:
            await self.app(scope, receive, send)
            return
        if FILES in matched:  # any file request first deletes exports over an hour old
            await anyio.to_thread.run_sync(self.labeling.sweep_exports)
        token = Request(scope).cookies.get(sessions.COOKIE)
        # Reads run here, in the event loop (a WAL read does not wait for writers; a thread hop per request cost
        # 15-20% of the votes/s with 32 annotators on 2 cores); the rare write a session needs goes to a thread.
        user, write = self.labeling.session_check(token) if token else (None, None)
        if write:
            await anyio.to_thread.run_sync(self.labeling.store.session_write, token, write)
        if user is None:
            if path == "/" and method in ("GET", "HEAD"):
                await RedirectResponse("login", status_code=303)(scope, receive, send)
            else:
                await refusal(401, "log in first")(scope, receive, send)
            return
        scope.setdefault("state", {})[sessions.USER_KEY] = user  # so the routes do not look it up again
        is_admin = None
        if role == ADMIN or matched.keys() & ENDPOINT_CALLS:
            account = self.labeling.store.user(user)
            is_admin = bool(account and account.is_admin)
        if role == NOBODY or (role == ADMIN and not is_admin):
            why = "not open to anyone" if role == NOBODY else "for admins only"
            await refusal(403, f"{method} {path}: {why}")(scope, receive, send)
            return
        owner = hashlib.sha256(token.encode()).hexdigest()
        if calls := matched.keys() & ENDPOINT_CALLS:
            template = sorted(calls)[0]
            receive, refused = await self.check_call(template, matched[template], receive, owner, is_admin)
            if refused is not None:
                await refused(scope, receive, send)
                return
            if template in STARTS_EVENTS:
                send = self.recording_events(send, owner)
        elif RESULTS_BY_HASH in matched:
            session_hash = (parse_qs(scope.get("query_string", b"").decode("latin-1")).get("session_hash") or [""])[0]
            if self.owners.hashes.get(session_hash) != owner:
                await refusal(404, "no events of this session under that session hash")(scope, receive, send)
                return
        elif RESULTS_BY_EVENT in matched:
            if self.owners.events.get(matched[RESULTS_BY_EVENT]["event_id"]) != owner:
                await refusal(404, "no event of this session with that id")(scope, receive, send)
                return
        if FILES in matched:
            await self.serve_once(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def check_call(self, template: str, params: dict, receive, owner: str, is_admin: bool):
        """Read an endpoint call's body: (a `receive` that replays it, None) when it may go on, else (receive, the
        refusal). SiteGuard has already capped the body at 64 KB."""
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return receive, refusal(400, "the request ended early")
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        replay = iter([{"type": "http.request", "body": body, "more_body": False}])

        async def replayed():
            return next(replay, None) or await receive()

        try:
            call = json.loads(body)
        except (ValueError, RecursionError):
            return replayed, refusal(422, "expected a JSON object")
        if not isinstance(call, dict) or not isinstance(call.get("data"), list):
            return replayed, refusal(422, "expected a JSON object with a 'data' list")
        session_hash, fn_index = call.get("session_hash"), call.get("fn_index")
        if session_hash is not None and not isinstance(session_hash, str):
            return replayed, refusal(422, "'session_hash' must be text")
        if fn_index is not None and (not isinstance(fn_index, int) or isinstance(fn_index, bool)):
            return replayed, refusal(422, "'fn_index' must be an integer")
        if template.startswith("/gradio_api/call/"):
            name = params["api_name"]  # call/ ignores fn_index
        elif fn_index is not None:  # run/ and queue/join run fns[fn_index], whatever the URL says
            name = gradio_internals.api_name_of(self.labeling.demo, fn_index)
        else:
            name = params.get("api_name")
        endpoint = ENDPOINTS.get(name or "")
        if endpoint is None:
            return replayed, refusal(404, "no such endpoint")
        if endpoint.role == ADMIN and not is_admin:
            return replayed, refusal(403, f"{name}: for admins only")
        why = self.argument_errors(name, endpoint, call["data"])
        if why:
            return replayed, JSONResponse({"error": f"{name}: " + "; ".join(f"{p}: {m}" for p, m in why),
                                           "detail": [{"__type__": "validate", "is_valid": False,
                                                       "parameter_name": p, "message": m} for p, m in why]},
                                          status_code=422)  # the "detail" form is the one gradio_client shows
        if session_hash is not None and not self.owners.claim_hash(session_hash, owner):
            return replayed, refusal(403, "that session hash belongs to another session")
        return replayed, None

    @staticmethod
    def argument_errors(name: str, endpoint: Endpoint, data: list) -> list[tuple[str, str]]:
        if len(data) != len(endpoint.args):
            return [("data", f"expected {len(endpoint.args)} arguments "
                             f"({', '.join(a for a, _ in endpoint.args) or 'none'}), got {len(data)}")]
        return [(arg, why) for (arg, check), value in zip(endpoint.args, data) if (why := check(value))]

    def recording_events(self, send, owner: str):
        """`send`, noting the event id of a successful answer (`{"event_id": ...}`) as this session's before the last
        byte of it goes out, so the session's next request already finds it."""
        state = {"status": 0, "body": b""}

        async def sending(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            elif message["type"] == "http.response.body" and state["status"] == 200:
                state["body"] += message.get("body", b"")
                if not message.get("more_body"):
                    try:
                        event_id = json.loads(state["body"]).get("event_id")
                    except (ValueError, AttributeError):
                        event_id = None
                    if isinstance(event_id, str):
                        self.owners.started(event_id, owner)
            await send(message)

        return sending

    async def serve_once(self, scope, receive, send) -> None:
        """An export served whole (200 to a GET) is deleted at once: ours and Gradio's cached copy (`sweep_exports`
        deletes only files named as exports)."""
        name = os.path.basename(unquote(scope["path"].split("/file=", 1)[1]))
        status = {}

        async def sending(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        await self.app(scope, receive, sending)
        if scope["method"] == "GET" and status.get("code") == 200:
            await anyio.to_thread.run_sync(partial(self.labeling.sweep_exports, only=name))

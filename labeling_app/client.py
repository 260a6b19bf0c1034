"""An annotator over HTTP: logs in and calls the page's own endpoints, as the browser does.

The load test, the crash test and `bench/labeling_load.py` use it to act as many
annotators at once. It logs in through Gradio's `/login` (which sets the session
cookie), opens the page through the `load` event, then votes and undoes through
`POST /label/api/vote` and `/label/api/undo`, the routes the page's buttons call.

It is built on the standard library's `http.client` with one kept-alive connection,
because 32 of these share two cores with the server they measure: an httpx client cost
about 4 ms of CPU per vote, as much as the server spent answering it.
"""

from __future__ import annotations

import http.client
import json
import secrets
from dataclasses import dataclass
from http.cookies import SimpleCookie
from urllib.parse import urlencode, urlsplit


class RequestFailed(Exception):
    """The server refused or failed a call (status code and body in the message)."""


class Disconnected(Exception):
    """No answer: the server is down, restarting, or dropped the connection mid-request."""


@dataclass
class PageState:
    presentation_id: str
    last_vote_id: str
    prompt: str
    left: str
    right: str
    progress: str
    status: str


class LabelingClient:
    def __init__(self, url: str, username: str, password: str, timeout: float = 30.0):
        parts = urlsplit(url)
        self.url = url.rstrip("/")
        self.host, self.port = parts.hostname, parts.port or 80
        self.username, self.password = username, password
        self.timeout = timeout
        self.cookies: dict[str, str] = {}
        self.session_hash = secrets.token_hex(8)
        self.page: PageState | None = None
        self._connection: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._connection:
            self._connection.close()
            self._connection = None

    def login(self) -> None:
        status, body = self.request("POST", "/login", urlencode({"username": self.username,
                                                                 "password": self.password}).encode(),
                                    "application/x-www-form-urlencoded")
        if status != 200:
            raise RequestFailed(f"login as {self.username}: HTTP {status} {body[:200]!r}")

    def load(self) -> PageState:
        self.page = PageState(*self.call("load", [])[:7])
        return self.page

    def vote(self, picked: str, reason: str = "", presentation_id: str | None = None) -> PageState:
        """Vote on the pair shown (or on `presentation_id`, to replay a request)."""
        pid = self.page.presentation_id if presentation_id is None else presentation_id
        return self.post("vote", {"presentation_id": pid, "choice": picked, "reason": reason})

    def undo(self) -> PageState:
        return self.post("undo", {"vote_id": self.page.last_vote_id})

    def call(self, api_name: str, data: list) -> list:
        """Call a Gradio endpoint (`load`, `admin_report`, ...) the way the page's events do."""
        return self._json(f"/gradio_api/run/{api_name}", {"data": data, "session_hash": self.session_hash},
                          api_name)["data"]

    def post(self, route: str, body: dict) -> PageState:
        """POST to `/label/api/<route>`; the answer is the page the annotator sees next."""
        page = self._json(f"/label/api/{route}", body, route)
        self.page = PageState(*(page[k] for k in ("presentation_id", "last_vote_id", "prompt", "left", "right",
                                                  "progress", "status")))
        return self.page

    def get(self, path: str) -> tuple[int, bytes]:
        return self.request("GET", path, None, None)

    def _json(self, path: str, body: dict, what: str) -> dict:
        status, raw = self.request("POST", path, json.dumps(body).encode(), "application/json")
        if status != 200:
            raise RequestFailed(f"{what} as {self.username}: HTTP {status} {raw[:300].decode(errors='replace')}")
        return json.loads(raw)

    def request(self, method: str, path: str, body: bytes | None, content_type: str | None) -> tuple[int, bytes]:
        headers = {"Content-Type": content_type} if content_type else {}
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        try:
            if self._connection is None:
                self._connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self._connection.request(method, path, body, headers)
            response = self._connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as e:
            self.close()  # a fresh connection next time
            raise Disconnected(f"{method} {path} as {self.username}: {e.__class__.__name__}: {e}") from None
        for header in response.headers.get_all("Set-Cookie") or []:
            for name, morsel in SimpleCookie(header).items():
                self.cookies[name] = morsel.value
        return response.status, data

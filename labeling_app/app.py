"""The annotator's page and the admin view: a Gradio app over `LabelStore`, served by uvicorn.

Who is asking always comes from the session the app created at login (its cookie, a row
in the label database: `sessions.py`; Gradio learns it through `auth_dependency`), never
from a request's arguments, so one annotator cannot act as another. The admin handlers
check the admin flag in the store on every call: hiding the tab is cosmetic, not the guard.
Responses reach the browser as HTML rendered on the server with raw HTML escaped
(`render.py`).

Votes go through two small JSON routes beside the Gradio app, `POST /label/api/vote`
and `POST /label/api/undo`, and the page's buttons call them with a few lines of
JavaScript (Gradio js-only events whose return value fills the outputs). Measured on 2
cores with 32 annotators, the same vote handler answered through a Gradio event cost
~9 ms more CPU per vote than through a plain route, and the 100 votes/s target was out
of reach. The routes take the same session cookie as the page, and they accept only
`application/json`. Requests from other sites are refused with 403 before any
route sees them, and only origins on `--allow-origin` get CORS headers (`siteguard.py`).
The load test and the benchmark call these same routes (`LabelingClient`).

Gradio endpoints (api names): `load` (what the page calls when it opens), `vote` and
`undo` (the same handlers, for gradio_client scripts), `admin_report`, `export` (admins).
Which route and which endpoint each role may use, and the type of each endpoint argument, is
one allow-list in `access.py`, enforced in front of every route; the server refuses to start
when an endpoint here is missing from it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from dataclasses import asdict, dataclass
from typing import Literal

import anyio
import gradio as gr
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.middleware.cors import CORSMiddleware

from align.errors import AlignError
from labeling_app import access, export, gradio_internals, quality, sessions, throttle
from labeling_app.siteguard import SiteGuard
from labeling_app.admin import build_report, report_markdown
from labeling_app.passwords import verify_password
from labeling_app.render import markdown_html, prompt_html
from labeling_app.store import CHOICES, LabelStore, Presentation, canonical_name

log = logging.getLogger("align")

# button label, element id, choice, keyboard shortcut(s)
BUTTONS = [
    ("A is better", "vote-left", "left", "1"),
    ("B is better", "vote-right", "right", "2"),
    ("Tie", "vote-tie", "tie", "3"),
    ("Both bad", "vote-both-bad", "both_bad", "4"),
    ("Skip", "vote-skip", "skip", "5 or s"),
]

STATUS = {
    "recorded": "Saved.",
    "already_recorded": "That vote was already saved; it counts once.",
    "pair_full": "While you were away, others gave that pair all the votes it needed; here is another one.",
    "not_assigned": "That pair is no longer assigned to you (opened in another tab?); here is your current one.",
}

DEFAULT_GUIDELINES = """\
Read the prompt, then both responses. Pick the one you would rather receive:
correct first, then helpful, then clear and concise. Length alone is not quality.

- **A is better** / **B is better**: one response is clearly preferable.
- **Tie**: both are about equally good.
- **Both bad**: neither is acceptable (wrong, harmful, or off-topic).
- **Skip**: you cannot judge this one (unfamiliar topic, unclear prompt).

A short reason helps reviewers, especially for ties and "both bad". Which response sits on
which side is random, so do not read anything into it.
"""

KEYBOARD_JS = """
<script>
document.addEventListener('keydown', (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
  const target = event.target;
  if (target && target.closest && target.closest('input, textarea, select, [contenteditable="true"]')) return;
  const ids = {'1': 'vote-left', '2': 'vote-right', '3': 'vote-tie', '4': 'vote-both-bad',
               '5': 'vote-skip', 's': 'vote-skip', 'u': 'vote-undo'};
  const id = ids[event.key.toLowerCase()];
  const button = id && document.getElementById(id);
  if (button && !button.disabled) { event.preventDefault(); button.click(); }
});
</script>
"""

# A js-only Gradio event: its inputs are the label tab's outputs, so on failure it can return
# them unchanged with only the status line replaced. `__BODY__` becomes the request body.
POST_JS = """
async (presentation_id, last_vote_id, prompt, left, right, progress, status, reason) => {
  const keep = [presentation_id, last_vote_id, prompt, left, right, progress];
  try {
    const response = await fetch('label/api/__ROUTE__', {
      method: 'POST', credentials: 'same-origin', headers: {'Content-Type': 'application/json'},
      body: JSON.stringify(__BODY__)});
    if (response.status === 401) return [...keep, 'Your session has ended: reload the page and log in again.', reason];
    if (!response.ok) return [...keep, 'The server could not save that (' + response.status + '); try again.', reason];
    const v = await response.json();
    return [v.presentation_id, v.last_vote_id, v.prompt, v.left, v.right, v.progress, v.status, v.reason];
  } catch (error) {
    return [...keep, 'No answer from the server; your vote was not confirmed. Try again: it will not count twice.',
            reason];
  }
}
"""

CSS = """
.response { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 12px;
            max-height: 60vh; overflow: auto; }
.response pre { white-space: pre-wrap; }
.turn .role { font-weight: 600; text-transform: capitalize; opacity: 0.7; }
"""


@dataclass
class LabelView:
    """Everything the label tab shows, in the order of its outputs."""

    presentation_id: str
    last_vote_id: str
    prompt: str
    left: str
    right: str
    progress: str
    status: str
    reason: str = ""
    pair_id: int | None = None  # not shown

    def outputs(self) -> tuple:
        return (self.presentation_id, self.last_vote_id, self.prompt, self.left, self.right, self.progress,
                self.status, self.reason)

    def json(self) -> dict:
        return asdict(self)


MAX_REASON = 2000  # characters of a vote's reason, on every path (JSON route, Gradio endpoint)
EXPORT_HOURS = 1.0  # an export file is deleted this long after it was written
EXPORT_NAME = re.compile(r"(preferences|raw|kto)-\d{8}-\d{6}\.jsonl")


class VoteBody(BaseModel):
    presentation_id: str = Field(max_length=64)
    choice: Literal["left", "right", "tie", "both_bad", "skip"]
    reason: str = Field("", max_length=MAX_REASON)


class UndoBody(BaseModel):
    vote_id: str = Field("", max_length=64)


class LabelingApp:
    def __init__(self, store: LabelStore, overlap: int = 3, lease_seconds: float = 600.0,
                 guidelines: str = DEFAULT_GUIDELINES, allow_origins: tuple[str, ...] = (), https: bool = False,
                 session_idle: float = sessions.IDLE, session_lifetime: float = sessions.LIFETIME,
                 files: str | None = None):
        self.store = store
        self.files = files  # this server's own folder (`serve`): exports, and Gradio's file cache beside them
        self.https, self.session_idle, self.session_lifetime = https, session_idle, session_lifetime
        self.allow_origins = tuple(allow_origins)  # other sites' pages allowed to call the app (CORS)
        self.overlap = overlap
        self.lease_seconds = lease_seconds
        self.guidelines = guidelines
        self._exports: str | None = None  # a folder of our own for export files Gradio then serves
        self.demo: gr.Blocks | None = None  # built by `server()`
        self._login_lock: anyio.Lock | None = None  # logins one at a time (made inside the event loop)
        # scrypt runs on a thread of its own, never on the pool whose threads store votes
        self._hash_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="align-scrypt")

    # -- what an annotator sees and does

    def view(self, user: str, status: str = "", shown: Presentation | None | bool = True) -> LabelView:
        """The label tab for `user` showing `shown` (by default: their current pair, leased if need be)."""
        if shown is True:
            shown = self.store.present(user, self.overlap, self.lease_seconds)
        done, remaining = self.store.progress(user, self.overlap)
        progress = f"Signed in as `{user}` · **{done}** done · **{remaining}** remaining · [Log out](logout)"
        last = self.store.last_vote_id(user) or ""
        if shown is None:
            return LabelView("", last, "<p><b>Nothing left for you to label.</b> Thank you!</p>", "", "",
                             progress, status)
        return LabelView(shown.presentation_id, last, prompt_html(shown.prompt),
                         f'<div class="response">{markdown_html(shown.left)}</div>',
                         f'<div class="response">{markdown_html(shown.right)}</div>', progress, status,
                         pair_id=shown.pair_id)

    def vote(self, picked: str, presentation_id: str, reason: str, user: str) -> LabelView:
        if picked not in CHOICES:
            raise ValueError(f"choice must be one of {CHOICES}, got {picked!r}")
        if not isinstance(presentation_id, str) or not isinstance(reason, (str, type(None))):
            return self.view(user, "Not saved: the presentation id and the reason must be text.")
        if not presentation_id:
            return self.view(user, "Nothing to vote on.")
        if len(reason or "") > MAX_REASON:
            return self.view(user, f"Not saved: the reason is {len(reason)} characters, at most {MAX_REASON}. "
                                   "Shorten it and vote again.")
        outcome = self.store.record_vote(user, presentation_id, picked, reason or "", self.overlap,
                                         self.lease_seconds)
        return self.view(user, STATUS[outcome.status], outcome.next)

    def undo(self, vote_id: str, user: str) -> LabelView:
        if not isinstance(vote_id, (str, type(None))):
            return self.view(user, "Nothing to undo.")
        outcome = self.store.undo(user, vote_id or "", self.overlap, self.lease_seconds)
        if outcome.undone is None:
            return self.view(user, "Nothing to undo.", outcome.next)
        if outcome.next and outcome.next.pair_id == outcome.undone.pair_id:
            return self.view(user, "Vote undone; here is that pair again.", outcome.next)
        # Only after undoing a skip on a pair that others have since filled.
        return self.view(user, "Vote undone; others have since given that pair all its votes.", outcome.next)

    # -- admins

    def require_admin(self, user: str) -> None:
        account = self.store.user(user)
        if account is None or not account.is_admin:
            raise gr.Error("The admin view is for admins only.", print_exception=False)

    def report(self, user: str) -> str:
        self.require_admin(user)
        return self.admin_markdown()

    def admin_markdown(self) -> str:
        """Progress, agreement and bias (`admin.py`), then annotator quality and the model leaderboard
        (`quality.py`; 200 bootstrap rounds here, `align label leaderboard` takes more)."""
        return "\n\n".join((report_markdown(build_report(self.store, self.overlap)),
                            quality.stats_markdown(quality.annotator_stats(self.store)),
                            quality.leaderboard_markdown(quality.leaderboard(self.store, rounds=200))))

    def export(self, kind: str, min_votes: float, min_agreement: float, user: str) -> str:
        self.require_admin(user)
        if kind not in export.KINDS:
            raise gr.Error("Export: expected preferences, raw or kto.", print_exception=False)
        try:
            min_votes, min_agreement = int(min_votes), float(min_agreement)
        except (TypeError, ValueError):
            raise gr.Error("Export: 'min votes' and 'min agreement' must be numbers.", print_exception=False) from None
        if self._exports is None:
            self._exports = os.path.join(self.files, "exports") if self.files else tempfile.mkdtemp(
                prefix="align-label-export-")
            os.makedirs(self._exports, exist_ok=True)
        self.sweep_exports()
        out = os.path.join(self._exports, f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
        try:
            if kind == "raw":
                export.export_raw(self.store, out)
            elif kind == "kto":
                export.export_kto(self.store, out, min_votes, min_agreement)
            else:
                export.export_preferences(self.store, out, min_votes, min_agreement)
        except AlignError as e:
            raise gr.Error(str(e), print_exception=False) from None
        return out

    def sweep_exports(self, now: float | None = None, only: str | None = None) -> None:
        """Delete export files older than EXPORT_HOURS (or, with `only`, every export of that name, just
        downloaded): ours, and the copies Gradio's file cache serves (this server's own folder under `serve`)."""
        now = time.time() if now is None else now
        for folder in filter(None, (self._exports, gradio_internals.upload_folder())):
            for root, _, names in os.walk(folder):
                for name in filter(EXPORT_NAME.fullmatch, names):
                    path = os.path.join(root, name)
                    if name == only or (only is None and now - os.path.getmtime(path) > EXPORT_HOURS * 3600):
                        os.remove(path)

    # -- sessions

    async def login(self, username: str, password: str) -> bool:
        """The login check, throttled (`throttle.py`). Logins run one at a time: the verdict, scrypt (~90 ms, on a
        thread of its own) and the failure it may record, so parallel guesses each see the ones before them."""
        address = throttle.CLIENT_ADDRESS.get()
        username = canonical_name(username)
        self._login_lock = self._login_lock or anyio.Lock()
        async with self._login_lock:
            now = time.time()
            since = now - throttle.WINDOW
            verdict = throttle.decide(
                await anyio.to_thread.run_sync(partial(self.store.login_failures, since, name=username)),
                await anyio.to_thread.run_sync(partial(self.store.login_failures, since, address=address)), now)
            if not verdict.allowed:
                why = "locked (too many failed logins)" if verdict.locked else "backing off"
                log.warning("login for %r from %s refused: %s for %.0f s more", username, address, why, verdict.wait)
                return False
            account = await anyio.to_thread.run_sync(self.store.user, username)
            ok = await asyncio.get_running_loop().run_in_executor(
                self._hash_pool, verify_password, password, account.password_hash if account else None)
            if ok:
                await anyio.to_thread.run_sync(self.store.clear_login_failures, username)
            else:
                await anyio.to_thread.run_sync(self.store.record_login_failure, username, address, time.time())
            return ok

    def session_user(self, request: Request) -> str | None:
        """The account of this request's live session (its `align-session` cookie), or None (`sessions.py`).
        Gradio asks the same, through `auth_dependency`; `access.Access` has usually looked it up already."""
        known = request.scope.get("state", {}).get(sessions.USER_KEY)
        if known:
            return known
        token = request.cookies.get(sessions.COOKIE)
        return self.store.session_user(token, self.session_idle, self.session_lifetime) if token else None

    def session_check(self, token: str) -> tuple[str | None, str | None]:
        """`session_user`'s read alone (`LabelStore.session_check`), for the event loop."""
        return self.store.session_check(token, self.session_idle, self.session_lifetime)

    # -- the server

    def server(self) -> FastAPI:
        """The vote routes, with the Gradio app mounted behind them at /."""

        @asynccontextmanager
        async def lifespan(app):
            yield
            if self.files:  # on a graceful stop (uvicorn then re-raises SIGTERM, so `serve` never returns)
                shutil.rmtree(self.files, ignore_errors=True)

        server = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

        def authorized(request: Request) -> str | JSONResponse:
            if not request.headers.get("content-type", "").startswith("application/json"):
                return JSONResponse({"error": "expected a JSON body"}, status_code=415)
            return self.session_user(request) or JSONResponse({"error": "log in first"}, status_code=401)

        # Plain `def`: FastAPI runs them on its thread pool, where the store's blocking writes belong.
        @server.post("/label/api/vote")
        def vote_route(body: VoteBody, request: Request):
            user = authorized(request)
            if isinstance(user, JSONResponse):
                return user
            return self.vote(body.choice, body.presentation_id, body.reason, user).json()

        @server.post("/label/api/undo")
        def undo_route(body: UndoBody, request: Request):
            user = authorized(request)
            if isinstance(user, JSONResponse):
                return user
            return self.undo(body.vote_id, user).json()

        sessions.add_session_routes(server, self)
        demo = self.demo = self.blocks()
        gradio_internals.check(demo)
        registered = gradio_internals.endpoint_names(demo)
        if registered != set(access.ENDPOINTS):
            raise RuntimeError(f"access.ENDPOINTS names {sorted(access.ENDPOINTS)} but the app registers "
                               f"{sorted(registered)}: classify every endpoint there")
        demo.queue(default_concurrency_limit=4)
        # Gradio's queue polls every 1 ms (and its progress loop every 10 ms) when idle: ~7% of a
        # core taken from the event loop that answers votes. Only admin events use the queue, and
        # waiting up to 50 ms to start costs them nothing.
        gradio_internals.quiet_queue(demo, 0.05)
        gr.mount_gradio_app(server, demo, path="/", auth_dependency=self.session_user, ssr_mode=False,
                            show_error=False, head=KEYBOARD_JS, css=CSS, footer_links=[])
        server.add_middleware(access.Access, labeling=self)  # who may use which route: one allow-list
        # An explicit CORS allow-list on the outer app (Gradio's own, which allows any origin with credentials,
        # steps aside when its parent configures CORS), then the cross-site guard outside everything.
        server.add_middleware(CORSMiddleware, allow_origins=list(self.allow_origins), allow_credentials=True,
                              allow_methods=["GET", "POST"], allow_headers=["content-type"])
        server.add_middleware(throttle.ClientAddress)
        server.add_middleware(SiteGuard, allow_origins=self.allow_origins)
        return server

    def blocks(self) -> gr.Blocks:
        def user_of(request: gr.Request) -> str:
            if not request or not request.username or not self.store.user(request.username):
                raise gr.Error("Log in first.", print_exception=False)
            return request.username

        with gr.Blocks(title="align · labeling", analytics_enabled=False) as demo:
            with gr.Tab("Label"):
                progress = gr.Markdown()
                with gr.Accordion("Guidelines", open=False):
                    gr.HTML(markdown_html(self.guidelines))
                gr.Markdown("**Prompt**")
                prompt = gr.HTML(elem_id="prompt")
                with gr.Row(equal_height=False):
                    with gr.Column():
                        gr.Markdown("**Response A**")
                        left = gr.HTML(elem_id="response-left")
                    with gr.Column():
                        gr.Markdown("**Response B**")
                        right = gr.HTML(elem_id="response-right")
                reason = gr.Textbox(label="Reason (optional)", lines=1, max_lines=4, elem_id="reason")
                with gr.Row():
                    buttons = [(gr.Button(f"{label} ({keys})", elem_id=elem_id,
                                          variant="primary" if choice in ("left", "right") else "secondary"), choice)
                               for label, elem_id, choice, keys in BUTTONS]
                    undo_button = gr.Button("Undo last vote (u)", elem_id="vote-undo")
                status = gr.Markdown(elem_id="status")
                presentation_id = gr.Textbox(visible=False)
                last_vote_id = gr.Textbox(visible=False)
                gr.Markdown(f"Keys: {' · '.join(f'{keys} {label}' for label, _, _, keys in BUTTONS)} · u undo. "
                            f"Each pair collects {self.overlap} independent vote{'s' if self.overlap > 1 else ''}.")
            label_outputs = [presentation_id, last_vote_id, prompt, left, right, progress, status, reason]

            with gr.Tab("Admin", visible=False) as admin_tab:
                refresh = gr.Button("Refresh")
                report = gr.Markdown()
                with gr.Row():
                    kind = gr.Radio(list(export.KINDS), value="preferences", label="Export")
                    min_votes = gr.Number(1, precision=0, minimum=1, label="min votes")
                    min_agreement = gr.Number(0.0, minimum=0, maximum=1, label="min agreement")
                export_button = gr.Button("Export")
                exported = gr.File(label="Exported file")

            def load(request: gr.Request):
                user = user_of(request)
                is_admin = self.store.user(user).is_admin
                return (*self.view(user).outputs(), gr.Tab(visible=is_admin),
                        self.admin_markdown() if is_admin else "")

            def vote(presentation_id: str, choice: str, reason: str, request: gr.Request) -> dict:
                """Vote on a presentation (left, right, tie, both_bad or skip); returns the next page as a dict."""
                if choice not in CHOICES:
                    raise gr.Error(f"choice must be one of {', '.join(CHOICES)}", print_exception=False)
                return self.vote(choice, presentation_id, reason, user_of(request)).json()

            def undo(vote_id: str, request: gr.Request) -> dict:
                """Take back the latest vote (its id); returns the page, showing that pair again."""
                return self.undo(vote_id, user_of(request)).json()

            def refresh_report(request: gr.Request):
                return self.report(user_of(request))

            def export_votes(what, at_least, agreement, request: gr.Request):
                return self.export(what, at_least, agreement, user_of(request))

            demo.load(load, None, [*label_outputs, admin_tab, report], queue=False, api_name="load")
            for button, choice in buttons:
                body = f"{{presentation_id, choice: '{choice}', reason}}"
                button.click(None, label_outputs, label_outputs,
                             js=POST_JS.replace("__ROUTE__", "vote").replace("__BODY__", body))
            undo_button.click(None, label_outputs, label_outputs,
                              js=POST_JS.replace("__ROUTE__", "undo").replace("__BODY__", "{vote_id: last_vote_id}"))
            gr.api(vote, api_name="vote", queue=False)
            gr.api(undo, api_name="undo", queue=False)
            refresh.click(refresh_report, None, report, api_name="admin_report")
            export_button.click(export_votes, [kind, min_votes, min_agreement], exported, api_name="export")
        return demo


def serve(store: LabelStore, host: str = "127.0.0.1", port: int = 7860, overlap: int = 3,
          lease_seconds: float = 600.0, guidelines: str = DEFAULT_GUIDELINES,
          allow_origins: tuple[str, ...] = (), https: bool = False, session_idle: float = sessions.IDLE,
          session_lifetime: float = sessions.LIFETIME) -> None:
    """Run the app until interrupted. Logging in is required for every page and route.

    The server keeps its files (exports, and Gradio's cache of what it serves, through Gradio's `GRADIO_TEMP_DIR`)
    in a fresh folder of its own, removed when it stops: a gradio_client or a second server on the same machine,
    which would otherwise share Gradio's machine-wide `<tmp>/gradio`, never sees or deletes them."""
    import uvicorn

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    files = tempfile.mkdtemp(prefix="align-label-")
    os.environ["GRADIO_TEMP_DIR"] = os.path.join(files, "gradio")
    try:
        server = LabelingApp(store, overlap, lease_seconds, guidelines, allow_origins, https, session_idle,
                             session_lifetime, files=files).server()
        uvicorn.run(server, host=host, port=port, log_level="warning")
    finally:
        shutil.rmtree(files, ignore_errors=True)

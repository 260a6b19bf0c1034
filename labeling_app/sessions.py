"""Sessions owned by the app: login, logout and the session cookie.

A login (`POST /login`, the form Gradio's own login used: `username`, `password`) that passes the
throttle and the password check creates a session in the label database: a random 256-bit token, of
which only a SHA-256 is stored, with its creation and last-use times. The token travels in the
cookie `align-session`: `HttpOnly`, `SameSite=Lax`, and `Secure` when the app is served over HTTPS
(`--https`, or a request whose scheme is https: uvicorn takes it from a proxy's
`X-Forwarded-Proto` on 127.0.0.1). A session ends after `idle` seconds unused (default 12 hours),
`lifetime` seconds after login (default 7 days), on logout (`POST /logout`; `GET /logout` only shows
a button that posts), when the account's password changes and when the account is removed; it
survives a server restart. Gradio learns the user through its supported hook, `auth_dependency`.

Who may open which route (the page, Gradio's routes, files) is `access.py`'s allow-list.

A login name is compared in its canonical form (`store.canonical_name`: Unicode NFKC, case-folded), so `Alice`,
`ALICE` and `alice` are one account.

A browser posting the login form gets a redirect to the page (or the form again, with one line
saying why); a script (`gradio_client`, `LabelingClient`) gets JSON and the cookie, 200 or 400.
"""

from __future__ import annotations

import html

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from labeling_app.store import canonical_name

COOKIE = "align-session"
USER_KEY = "align_user"  # the request's account, in its scope's state once `access.Access` has looked it up
IDLE = 12 * 3600.0
LIFETIME = 7 * 24 * 3600.0

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>align · labeling · {title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body {{ font-family: system-ui, sans-serif; max-width: 22rem; margin: 12vh auto; padding: 0 1rem; }}
input, button {{ display: block; width: 100%; margin: .4rem 0 1rem; padding: .5rem; font-size: 1rem;
box-sizing: border-box; }} .why {{ color: #b00020; }}</style></head>
<body><h1>align · labeling</h1>{body}</body></html>"""

LOGIN_FORM = """<p>Sign in with the name and password your admin gave you.</p>{why}
<form method="post" action="login"><label>Name<input name="username" autocomplete="username" autofocus
required></label><label>Password<input name="password" type="password" autocomplete="current-password"
required></label><button type="submit">Sign in</button></form>"""

LOGOUT_FORM = """<form method="post" action="logout"><button type="submit">Log out</button></form>"""

REFUSED = "Wrong name or password, or too many tries: wait a little and try again."


def wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


def login_page(why: str = "", status: int = 200) -> HTMLResponse:
    why_html = f'<p class="why">{html.escape(why)}</p>' if why else ""
    return HTMLResponse(PAGE.format(title="sign in", body=LOGIN_FORM.format(why=why_html)), status_code=status)


def add_session_routes(server: FastAPI, labeling) -> None:
    """`GET/POST /login`, `GET/POST /logout` on the outer app (before the Gradio mount, so they take the paths)."""

    async def show_login(request: Request):
        if await anyio.to_thread.run_sync(labeling.session_user, request):
            return RedirectResponse("./", status_code=303)
        return login_page()

    async def do_login(request: Request):
        form = await request.form()
        username = canonical_name(str(form.get("username", "")).strip())
        password = str(form.get("password", ""))
        if not username or not await labeling.login(username, password):
            return login_page(REFUSED, 400) if wants_html(request) else JSONResponse({"error": REFUSED}, 400)
        token = await anyio.to_thread.run_sync(labeling.store.create_session, username)
        response = RedirectResponse("./", status_code=303) if wants_html(request) else JSONResponse({"success": True})
        secure = labeling.https or request.url.scheme == "https"
        response.set_cookie(COOKIE, token, max_age=int(labeling.session_lifetime), httponly=True, samesite="lax",
                            secure=secure, path="/")
        return response

    async def show_logout(request: Request):
        return HTMLResponse(PAGE.format(title="log out", body=LOGOUT_FORM))

    async def do_logout(request: Request):
        token = request.cookies.get(COOKIE)
        if token:
            await anyio.to_thread.run_sync(labeling.store.end_session, token)
        response: Response = (RedirectResponse("login", status_code=303) if wants_html(request)
                              else JSONResponse({"success": True}))
        response.delete_cookie(COOKIE, path="/")
        return response

    for path in ("/login", "/login/"):  # gradio_client posts to "login" joined to the app's URL
        server.add_api_route(path, show_login, methods=["GET"], include_in_schema=False)
        server.add_api_route(path, do_login, methods=["POST"], include_in_schema=False)
    for path in ("/logout", "/logout/"):
        server.add_api_route(path, show_logout, methods=["GET"], include_in_schema=False)
        server.add_api_route(path, do_logout, methods=["POST"], include_in_schema=False)

"""Who may use what (labeling_app/access.py), against the real server: every route the app and Gradio register,
walked for no session, an annotator and an admin; and issue #18's probes, each refused."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from labeling_app import access, gradio_internals
from labeling_app.loadtest import PASSWORD, ServerProcess, seed_database
from labeling_app.passwords import hash_password
from labeling_app.store import LabelStore

ADMIN_PASSWORD = "admin-password-1"
OURS = {"log in first"}  # what access.Access answers when it refuses (with "... for admins only" and the like)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Admin alice, annotators bob and carol, as in the probe."""
    db = tmp_path_factory.mktemp("label-access") / "labels.sqlite"
    seed_database(db, ["bob", "carol"], pairs=20)
    with LabelStore(db) as store:
        store.add_user("alice", hash_password(ADMIN_PASSWORD), is_admin=True)
    with ServerProcess(db, overlap=2) as running:
        yield running


def client(server, user: str | None) -> httpx.Client:
    c = httpx.Client(base_url=server.url, timeout=20)
    if user:
        password = ADMIN_PASSWORD if user == "alice" else PASSWORD
        assert c.post("/login", data={"username": user, "password": password}).status_code == 200
    return c


def registered_routes(tmp_path) -> list[tuple[str, str]]:
    """The routes of the real app, read from its router (the same code the server runs)."""
    from labeling_app.app import LabelingApp

    seed_database(tmp_path / "routes.sqlite", ["ann"], pairs=1)
    with LabelStore(tmp_path / "routes.sqlite") as store:
        return gradio_internals.routes(LabelingApp(store).server())


def refused_by_access(response: httpx.Response, c: httpx.Client) -> bool:
    """A refusal of access.Access (not Gradio's own 403 for, say, a file outside its folders)."""
    if response.status_code not in (401, 403):
        return False
    if response.request.method == "HEAD":  # no body to tell by: the GET of the same path says who refused
        response = c.get(response.request.url)
    error = response.json().get("error", "")
    return error in OURS or error.endswith((": for admins only", ": not open to anyone"))


def test_every_route_is_classified_and_answers_as_classified(server, tmp_path):
    """Every (method, route) the router has is in access.ROUTES (a route a new Gradio adds fails here until it is
    classified), and the real server answers each as the table says: refused with 401 without a session and 403
    for the wrong role, by access.Access; allowed ones never 5xx, even with made-up parameters and an empty body."""
    routes = registered_routes(tmp_path)
    assert len(routes) > 80
    unclassified = sorted(set(routes) - set(access.ROUTES))
    assert unclassified == [], f"classify these in labeling_app/access.py ROUTES: {unclassified}"
    assert sorted(set(access.ROUTES) - set(routes)) == []  # no entry for a route that no longer exists

    rank = {access.PUBLIC: 0, access.USER: 1, access.ADMIN: 2, access.NOBODY: 3}
    may = {None: 0, "bob": 1, "alice": 2}
    logouts_last = sorted(set(routes), key=lambda r: "/logout" in r[1])
    seen = 0
    for user in (None, "bob", "alice"):
        c = client(server, user)
        for method, template in logouts_last:
            path = re.sub(r"\{[^}]+\}", "x", template)
            response = c.request(method, path, json={} if method == "POST" else None)
            needed = access.ROUTES[(method, template)]
            what = f"{method} {template} as {user or 'no session'}: {response.status_code} {response.text[:200]}"
            assert response.status_code < 500, what
            if rank[needed] <= may[user]:
                assert not refused_by_access(response, c), what
            elif user is None and template == "/":
                assert response.status_code == 303 and response.headers["location"] == "login", what
            else:
                assert response.status_code == (401 if user is None else 403), what
                assert refused_by_access(response, c), what
            seen += 1
    assert seen == 3 * len(set(routes))


def test_what_is_open_without_a_session_is_the_login_form_and_gradios_own_files():
    public = {template for (_, template), role in access.ROUTES.items() if role == access.PUBLIC}
    assert public == {"/login", "/login/", "/logout", "/logout/", "/assets/{path:path}", "/static/{path:path}",
                      "/svelte/{path:path}", "/favicon.ico", "/robots.txt", "/theme.css", "/gradio_api/theme.css",
                      "/manifest.json", "/pwa_icon", "/pwa_icon/{size}"}


def test_paths_and_methods_no_route_has_are_refused(server):
    anonymous, bob = client(server, None), client(server, "bob")
    for method, path in (("GET", "/nothing-here"), ("DELETE", "/config"), ("PUT", "/label/api/vote"),
                         ("GET", "/gradio_api/nothing"), ("OPTIONS", "/config")):
        assert anonymous.request(method, path).status_code == 401
        assert bob.request(method, path).status_code == 403


def a_vote(url: str, user: str, reason: str = "") -> None:
    """One vote by `user`, so that an export has something in it."""
    c = httpx.Client(base_url=url)
    assert c.post("/login", data={"username": user, "password": PASSWORD}).status_code == 200
    pid = c.post("/gradio_api/run/load", json={"data": []}).json()["data"][0]
    voted = c.post("/label/api/vote", json={"presentation_id": pid, "choice": "tie", "reason": reason})
    assert voted.status_code == 200 and voted.json()["status"] == "Saved."


def test_probe_1_an_annotator_reads_no_export_and_no_one_elses_results(server):
    """Issue #18, probe 1: Gradio's older file route served an admin's raw export to an annotator (and kept it), and
    Gradio's call route handed alice's export path to bob, given its event id."""
    from gradio_client import Client

    alice, bob, carol = client(server, "alice"), client(server, "bob"), client(server, "carol")
    a_vote(server.url, "bob", "bob's reason")

    data = Client(server.url, auth=("alice", ADMIN_PASSWORD), verbose=False,
                  download_files=False).predict("raw", 1, 0, api_name="/export")
    cached = data["path"] if isinstance(data, dict) else data.path
    for route in (f"/gradio_api/file/{cached}", f"/gradio_api/file={cached}"):
        refused = bob.get(route)
        assert refused.status_code == 403 and "bob's reason" not in refused.text, route
    assert os.path.exists(cached)

    started = alice.post("/gradio_api/call/export", json={"data": ["raw", 1, 0]})
    assert started.status_code == 200
    event_id = started.json()["event_id"]
    for other in (bob, carol):
        stolen = other.get(f"/gradio_api/call/export/{event_id}")
        assert stolen.status_code == 404 and "raw-" not in stolen.text
        stolen = other.get("/gradio_api/queue/data", params={"session_hash": event_id})
        assert stolen.status_code == 404 and "raw-" not in stolen.text
    own = alice.get(f"/gradio_api/call/export/{event_id}")
    assert own.status_code == 200 and "event: complete" in own.text and "raw-" in own.text

    # the page's way: queue/join under a session hash, results read from queue/data under it
    [export_fn] = [i for i, name in enumerate_endpoints(alice) if name == "export"]
    joined = alice.post("/gradio_api/queue/join", json={"data": ["raw", 1, 0], "fn_index": export_fn,
                                                        "session_hash": "alices-page"})
    assert joined.status_code == 200
    assert bob.get("/gradio_api/queue/data", params={"session_hash": "alices-page"}).status_code == 404
    taken = bob.post("/gradio_api/queue/join", json={"data": [], "fn_index": load_fn(alice),
                                                     "session_hash": "alices-page"})
    assert taken.status_code == 403 and "another session" in taken.text
    with alice.stream("GET", "/gradio_api/queue/data", params={"session_hash": "alices-page"}) as stream:
        assert stream.status_code == 200
        text = ""
        for line in stream.iter_lines():
            text += line
            if "process_completed" in line:
                break
    assert "raw-" in text
    # an annotator cannot start an admin's event at all, by name or by index
    assert bob.post("/gradio_api/call/export", json={"data": ["raw", 1, 0]}).status_code == 403
    assert bob.post("/gradio_api/run/load", json={"data": ["raw", 1, 0], "fn_index": export_fn}).status_code == 403


def enumerate_endpoints(c: httpx.Client) -> list[tuple[int, str]]:
    """(fn_index, api name) of the page's events, from its config."""
    config = c.get("/config").json()
    return [(d["id"], d.get("api_name")) for d in config["dependencies"]]


def load_fn(c: httpx.Client) -> int:
    return next(i for i, name in enumerate_endpoints(c) if name == "load")


@pytest.mark.parametrize("origin", ["http://127.0.0.1:abc", "http://127.0.0.1:99999", "http://[::1",
                                    "http://127.0.0.1:-1", "http://[::1]:x", "http://[zz]"])
def test_probe_2_a_malformed_origin_is_refused_not_a_500(server, origin):
    response = httpx.get(server.url + "/config", headers={"Origin": origin})
    assert response.status_code == 403 and "Traceback" not in response.text
    assert response.json() == {"error": "cross-site request refused"}


def label(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "labeling_app", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_probe_3_names_are_folded_and_a_trailing_newline_refused(server):
    for name, why in (("alice\n", "has a control or invisible character"), ("al\tice", "control or invisible"),
                      ("Alice", "user 'alice' already exists"), ("ALICE", "user 'alice' already exists"),
                      ("\uff41\uff4c\uff49\uff43\uff45", "user 'alice' already exists")):  # full-width alice
        added = label("users", "add", name, "--password-stdin", "--db", server.db, stdin="another-password-1\n")
        assert added.returncode == 2 and added.stderr.count("\n") == 1 and why in added.stderr, (name, added.stderr)
    with LabelStore(server.db) as store:
        assert [u.name for u in store.users()] == ["alice", "bob", "carol"]
    # the name is folded when logging in too: ALICE is alice (same account, same throttle)
    shouting = httpx.Client(base_url=server.url)
    assert shouting.post("/login", data={"username": "ALICE", "password": ADMIN_PASSWORD}).status_code == 200
    report = shouting.post("/gradio_api/run/admin_report", json={"data": []})
    assert report.status_code == 200 and "| alice (admin) |" in report.json()["data"][0]


@pytest.mark.parametrize("reason", [5, ["a"], {}, None, True])
def test_probe_4_a_reason_that_is_not_text_gets_422_on_every_path(server, reason):
    from gradio_client import Client

    carol = client(server, "carol")
    pid = carol.post("/gradio_api/run/load", json={"data": []}).json()["data"][0]
    with LabelStore(server.db) as store:
        before = store.votes("carol")
    for route in ("/gradio_api/run/vote", "/gradio_api/call/vote"):
        answer = carol.post(route, json={"data": [pid, "left", reason]})
        assert answer.status_code == 422 and "reason: expected text" in answer.text, (route, answer.text)
    answer = carol.post("/label/api/vote", json={"presentation_id": pid, "choice": "left", "reason": reason})
    assert answer.status_code == 422  # the JSON route (its reason may be left out, not be null)
    with pytest.raises(Exception, match="reason: expected text"):
        Client(server.url, auth=("carol", PASSWORD), verbose=False).predict(pid, "left", reason, api_name="/vote")
    with LabelStore(server.db) as store:
        assert store.votes("carol") == before


def test_probe_5_without_a_session_no_route_list_and_no_stream(server):
    anonymous, bob = client(server, None), client(server, "bob")
    for path in ("/openapi.json", "/gradio_api/openapi.json", "/gradio_api/heartbeat/x", "/gradio_api/info",
                 "/gradio_api/queue/data?session_hash=x", "/gradio_api/call/load/x"):
        start = time.monotonic()
        assert anonymous.get(path).status_code == 401, path
        assert time.monotonic() - start < 5  # answered, not held open
    for path in ("/openapi.json", "/gradio_api/openapi.json", "/gradio_api/heartbeat/x"):
        assert bob.get(path).status_code == 403, path


def test_a_server_keeps_its_files_apart_from_clients_and_other_servers(server, tmp_path):
    """Issue #18's flaky gradio_client test: client and server shared Gradio's machine-wide <tmp>/gradio, and the
    server's delete-after-download (which deletes every file of the export's name under its cache) removed the copy
    the client had just saved there. Each server now has a folder of its own (GRADIO_TEMP_DIR, set by `serve`),
    removed when it stops: a file of the same name in a client's or another server's folder survives a download."""
    import uuid

    from gradio_client import Client
    from gradio_client.client import DEFAULT_TEMP_DIR

    db = tmp_path / "other.sqlite"
    seed_database(db, ["dave"], pairs=2)
    with LabelStore(db) as store:
        store.add_user("eve", hash_password(ADMIN_PASSWORD), is_admin=True)
    a_vote(server.url, "carol")
    cached = []
    with ServerProcess(db) as other:
        a_vote(other.url, "dave")
        for running, admin in ((server, "alice"), (other, "eve")):
            data = Client(running.url, auth=(admin, ADMIN_PASSWORD), verbose=False,
                          download_files=False).predict("raw", 1, 0, api_name="/export")
            cached.append(Path(data["path"] if isinstance(data, dict) else data.path))
        folders = [path.parents[2] for path in cached]  # <tmp>/align-label-*/gradio/<hash>/<name>
        assert folders[0] != folders[1] and all(f.name.startswith("align-label-") for f in folders)
        assert all(Path(DEFAULT_TEMP_DIR).resolve() not in f.resolve().parents for f in folders)

        # same-named files where the client and the other server keep theirs
        name = cached[0].name
        clients = Path(DEFAULT_TEMP_DIR) / f"align-test-{uuid.uuid4().hex}" / name
        others = folders[1] / "gradio" / "same-name" / name
        for planted in (clients, others):
            planted.parent.mkdir(parents=True)
            planted.write_text("not the server's")
        try:
            assert client(server, "alice").get(f"/gradio_api/file={cached[0]}").status_code == 200
            deadline = time.monotonic() + 10
            while list(folders[0].rglob(name)) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert list(folders[0].rglob(name)) == []  # the server's own copies: gone once downloaded
            assert clients.read_text() == others.read_text() == "not the server's"
        finally:
            clients.unlink(missing_ok=True)
            clients.parent.rmdir()

        downloaded = Client(other.url, auth=("eve", ADMIN_PASSWORD), verbose=False).predict(
            "raw", 1, 0, api_name="/export")  # gradio_client's own download, into its <tmp>/gradio
        assert json.loads(Path(downloaded).read_text().splitlines()[0])["annotator"] == "dave"
    assert not folders[1].exists() and folders[0].exists()  # a stopped server's folder goes with it

"""The real labeling server in a child process: gradio_client, isolation, 32 annotators, SIGKILL."""

import json
import re
import threading
import time
from pathlib import Path

import httpx
import pytest

from labeling_app.client import LabelingClient, RequestFailed
from labeling_app.loadtest import PASSWORD, LoadResult, ServerProcess, run_annotators, seed_database
from labeling_app.passwords import hash_password
from labeling_app.store import LabelStore

OVERLAP = 3
LOAD_USERS = [f"load{i:02d}" for i in range(1, 33)]
VOTES_EACH = 25
ADMIN_PASSWORD = "admin-password-1"
GUIDELINES = "Prefer answers that **state the unit**. <b>raw html</b> stays text."


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for this module: 32 load annotators, ann and bob, and an admin."""
    db = tmp_path_factory.mktemp("label-server") / "labels.sqlite"
    # Enough pairs that 32 x 25 votes at K=3 never run out (800 votes need ~267 pairs).
    seed_database(db, LOAD_USERS + ["ann", "bob"], pairs=400)
    with LabelStore(db) as store:
        store.add_user("root", hash_password(ADMIN_PASSWORD), is_admin=True)
    guidelines = db.parent / "guidelines.md"
    guidelines.write_text(GUIDELINES)
    with ServerProcess(db, overlap=OVERLAP, extra=["--guidelines", str(guidelines)]) as running:
        yield running


def store_of(server) -> LabelStore:
    return LabelStore(server.db)


def test_logging_in_is_required_for_everything(server):
    anonymous = httpx.Client(base_url=server.url)
    assert anonymous.get("/config").status_code == 401
    assert anonymous.post("/gradio_api/run/load", json={"data": []}).status_code == 401
    assert anonymous.post("/label/api/vote", json={"presentation_id": "x", "choice": "left"}).status_code == 401
    assert anonymous.post("/label/api/undo", json={"vote_id": "x"}).status_code == 401
    assert anonymous.post("/login", data={"username": "ann", "password": "wrong password"}).status_code == 400
    assert anonymous.post("/login", data={"username": "nobody", "password": PASSWORD}).status_code == 400
    # throttle.py: the first failure made this address wait 0.5 s, so the second, when it came within that, was
    # refused unchecked and not counted; cleared, so the next logins from here do not wait
    with store_of(server) as store:
        assert store.clear_login_failures("ann") == 1 and store.clear_login_failures("nobody") in (0, 1)


def test_the_page_carries_the_guidelines_file(server):
    ann = LabelingClient(server.url, "ann", PASSWORD)
    ann.login()
    status, body = ann.get("/config")
    config = body.decode()
    assert status == 200
    assert "Prefer answers that <strong>state the unit</strong>." in config and "&lt;b&gt;raw html" in config


def test_gradio_client_logs_in_votes_undoes_and_exports(server, tmp_path):
    """Run it many times (`--count 20`): each run is a new annotator, and the admin's export, downloaded by
    gradio_client into its own <tmp>/gradio, is never deleted under it by the server (issue #18's flake)."""
    import uuid

    from gradio_client import Client

    name = f"gc{uuid.uuid4().hex[:8]}"
    with store_of(server) as store:
        store.add_user(name, hash_password(PASSWORD))
    ann = Client(server.url, auth=(name, PASSWORD), verbose=False)
    page = ann.predict(api_name="/load")
    pid = page[0]
    assert pid and "Answer A" in page[3] + page[4] and "**0** done" in page[5]

    voted = ann.predict(pid, "left", "clearer", api_name="/vote")
    assert voted["status"] == "Saved." and voted["last_vote_id"] == pid and voted["presentation_id"] != pid
    again = ann.predict(pid, "left", "clearer", api_name="/vote")  # a retried request
    assert again["status"].startswith("That vote was already saved")
    with store_of(server) as store:
        (vote,) = store.votes(name)
    assert vote.vote_id == pid and vote.reason == "clearer" and vote.picked_side == "left"

    undone = ann.predict(pid, api_name="/undo")
    assert undone["status"] == "Vote undone; here is that pair again." and undone["pair_id"] == vote.pair_id
    with store_of(server) as store:
        assert store.votes(name) == []
    final = ann.predict(undone["presentation_id"], "right", "", api_name="/vote")
    assert final["status"] == "Saved."

    admin = Client(server.url, auth=("root", ADMIN_PASSWORD), verbose=False)
    admin_view = admin.predict(api_name="/admin_report")
    assert "Krippendorff" in admin_view and "### Annotator quality" in admin_view and f"| {name} |" in admin_view
    exported = admin.predict("raw", 1, 0, api_name="/export")
    rows = [json.loads(line) for line in open(exported)]
    mine = [r for r in rows if r["annotator"] == name]
    assert len(mine) == 1 and mine[0]["vote_id"] == undone["presentation_id"] and mine[0]["picked_side"] == "right"


def test_annotators_cannot_read_or_change_each_others_votes_or_reach_admin(server):
    ann, bob = LabelingClient(server.url, "ann", PASSWORD), LabelingClient(server.url, "bob", PASSWORD)
    for client in (ann, bob):
        client.login()
        client.load()
    anns_pair = ann.page.presentation_id
    ann.vote("tie", "ann's reason")
    anns_vote = ann.page.last_vote_id
    with store_of(server) as store:
        before = [(v.vote_id, v.choice, v.reason) for v in store.votes("ann")]

    # bob replays ann's presentation and vote ids: nothing of hers changes, nothing is recorded for him.
    assert bob.vote("left", "stolen", presentation_id=anns_pair).status.startswith("That pair is no longer assigned")
    assert bob.post("undo", {"vote_id": anns_vote}).status == "Nothing to undo."
    with store_of(server) as store:
        assert [(v.vote_id, v.choice, v.reason) for v in store.votes("ann")] == before
        assert all(v.vote_id != anns_pair for v in store.votes("bob"))
    # bob's page and answers carry nothing of ann's.
    page = bob.load()
    assert anns_pair not in json.dumps(page.__dict__) and "ann's reason" not in json.dumps(page.__dict__)
    assert "`bob`" in page.progress

    # A cross-site form can only send form encodings, never JSON: such a POST records nothing.
    status, _ = bob.request("POST", "/label/api/vote", b"presentation_id=" + bob.page.presentation_id.encode()
                            + b"&choice=left", "application/x-www-form-urlencoded")
    assert status in (415, 422)
    status, _ = bob.request("POST", "/label/api/vote", json.dumps({"presentation_id": bob.page.presentation_id,
                                                                   "choice": "left"}).encode(), "text/plain")
    assert status in (415, 422)
    with store_of(server) as store:
        assert store.votes("bob") == []

    for api, data in (("admin_report", []), ("export", ["raw", 1, 0])):
        with pytest.raises(RequestFailed, match="admins only"):
            bob.call(api, data)
    loaded = bob.call("load", [])
    assert loaded[8]["visible"] is False and loaded[9] == ""  # admin tab hidden, no report


def test_32_annotators_25_votes_each_every_acknowledged_vote_stored_exactly_once(server):
    accounts = [(name, PASSWORD) for name in LOAD_USERS]
    result = run_annotators(server.url, accounts, VOTES_EACH, resend_every=5)
    print(f"\n32 annotators: {result.votes_per_second:.0f} votes/s, p50 {result.percentile(50) * 1000:.0f} ms, "
          f"p95 {result.percentile(95) * 1000:.0f} ms")
    assert result.errors == []
    assert len(result.acked) == 32 * VOTES_EACH and result.resent == 32 * (VOTES_EACH // 5)
    with store_of(server) as store:
        votes = [v for v in store.votes() if v.annotator in LOAD_USERS]
        pairs = store.pairs()
        all_votes = store.votes()
    assert sorted(v.vote_id for v in votes) == sorted(result.acked)  # each once: no loss, no double count
    assert all(result.acked[v.vote_id] == v.annotator for v in votes)
    assert len({(v.annotator, v.pair_id) for v in votes}) == len(votes)  # nobody judged a pair twice
    counted = {}
    for v in all_votes:
        if v.choice != "skip":
            counted[v.pair_id] = counted.get(v.pair_id, 0) + 1
    assert all(p.filled == counted.get(p.id, 0) <= OVERLAP for p in pairs)  # never more than K votes


def test_sigkill_mid_load_then_restart_loses_no_acknowledged_vote(tmp_path):
    names = [f"crash{i:02d}" for i in range(1, 33)]
    db = tmp_path / "labels.sqlite"
    seed_database(db, names, pairs=400)
    server = ServerProcess(db, overlap=OVERLAP).start()
    result = LoadResult()
    try:
        load = threading.Thread(target=run_annotators, args=(server.url, [(n, PASSWORD) for n in names], VOTES_EACH),
                                kwargs={"retry_for": 120, "result": result})
        load.start()
        deadline = time.monotonic() + 60
        while len(result.acked) < 250 and time.monotonic() < deadline:
            time.sleep(0.02)
        server.kill()  # in the middle of the load: 32 clients have requests in flight
        acked_before_kill = len(result.acked)
        server.start()
        load.join(180)
        assert not load.is_alive()
    finally:
        server.stop()
    assert 0 < acked_before_kill < 32 * VOTES_EACH and result.retries > 0  # the kill really interrupted the load
    assert result.errors == []
    with LabelStore(db) as store:
        stored = {v.vote_id for v in store.votes()}
        pairs = store.pairs()
    assert set(result.acked) <= stored  # every acknowledged vote survived the kill
    assert len(stored) == len(result.acked) == 32 * VOTES_EACH  # and retries across the restart counted once
    assert all(p.filled <= OVERLAP for p in pairs)


EVIL = "https://evil.example"


def logged_in_client(url: str, user: str) -> httpx.Client:
    client = httpx.Client(base_url=url)
    assert client.post("/login", data={"username": user, "password": PASSWORD}).status_code == 200
    return client


def new_annotator(server, name: str) -> tuple[httpx.Client, str]:
    """A new account, logged in (an httpx client holding its cookie), and the presentation id of its first pair."""
    with store_of(server) as store:
        store.add_user(name, hash_password(PASSWORD))
    page = LabelingClient(server.url, name, PASSWORD)
    page.login()
    return logged_in_client(server.url, name), page.load().presentation_id


def test_cross_site_requests_are_refused_and_store_nothing(server):
    """Issue #12's probe, repeated: behind a real host name, a page on another site holding only the annotator's
    cookie gets nothing of the page, no CORS headers and no vote; same-site requests (an `Origin` naming the host
    the request was sent to, as a proxy forwards it) and clients that send no `Origin` keep working."""
    carol, pid = new_annotator(server, "carol")
    proxied = {"Host": "labels.example.com"}

    config = carol.get("/config", headers={**proxied, "Origin": EVIL})
    assert config.status_code == 403 and "cross-site request refused" in config.text
    assert "access-control-allow-origin" not in config.headers
    preflight = carol.options("/label/api/vote", headers={"Origin": EVIL, "Access-Control-Request-Method": "POST",
                                                          "Access-Control-Request-Headers": "content-type"})
    assert preflight.status_code == 403 and "access-control-allow-origin" not in preflight.headers
    body = {"presentation_id": pid, "choice": "left", "reason": "forged"}
    assert carol.post("/label/api/vote", json=body, headers={"Origin": EVIL}).status_code == 403
    assert carol.post("/gradio_api/run/vote", json={"data": [pid, "left", "forged"]},
                      headers={"Origin": EVIL}).status_code == 403
    assert carol.post("/label/api/vote", json=body, headers={"Origin": "null"}).status_code == 403
    # no Origin, but the browser says the request crossed sites (a form POST): refused; a GET navigation is not
    assert carol.post("/label/api/vote", json=body, headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert carol.get("/", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200
    assert httpx.post(server.url + "/login", data={"username": "carol", "password": PASSWORD},
                      headers={"Origin": EVIL}).status_code == 403
    with store_of(server) as store:
        assert store.votes("carol") == []

    proxied_same_site = carol.get("/config", headers={**proxied, "Origin": "https://labels.example.com"})
    assert proxied_same_site.status_code == 200  # past the guard
    same_site = carol.get("/config", headers={"Origin": server.url})
    assert same_site.status_code == 200 and "components" in same_site.json()
    saved = carol.post("/label/api/vote", json=body, headers={"Origin": server.url})
    assert saved.status_code == 200 and saved.json()["status"] == "Saved."
    with store_of(server) as store:
        (vote,) = store.votes("carol")
    assert vote.vote_id == pid and vote.reason == "forged"


def test_every_response_carries_the_security_headers(server):
    anonymous = httpx.Client(base_url=server.url)
    for response in (anonymous.get("/"), anonymous.get("/config"), anonymous.get("/", headers={"Origin": EVIL})):
        assert response.headers["content-security-policy"] == "frame-ancestors 'none'"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "same-origin"


def test_an_allowed_origin_gets_cors_and_others_still_do_not(tmp_path):
    db = tmp_path / "labels.sqlite"
    seed_database(db, ["ann"], pairs=4)
    tools = "https://tools.example.com"
    with ServerProcess(db, extra=["--allow-origin", tools]) as running:
        ann = logged_in_client(running.url, "ann")
        preflight = ann.options("/label/api/vote", headers={"Origin": tools, "Access-Control-Request-Method": "POST",
                                                            "Access-Control-Request-Headers": "content-type"})
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == tools
        config = ann.get("/config", headers={"Origin": tools})
        assert config.status_code == 200 and config.headers["access-control-allow-origin"] == tools
        assert config.headers["access-control-allow-credentials"] == "true"
        refused = ann.get("/config", headers={"Origin": EVIL})
        assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers


@pytest.mark.parametrize("origin", ["tools.example.com", "https://tools.example.com/path", "null"])
def test_allow_origin_takes_an_origin_only(tmp_path, origin):
    import subprocess
    import sys

    db = tmp_path / "labels.sqlite"
    seed_database(db, ["ann"], pairs=1)
    done = subprocess.run([sys.executable, "-m", "labeling_app", "serve", "--db", str(db), "--allow-origin", origin],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert f"--allow-origin {origin}: expected an origin such as https://tools.example.com" in done.stderr


def test_limits_hold_on_every_path(server):
    """A reason over 2000 characters is refused by the JSON route (422) and by the Gradio endpoint (our message,
    nothing stored); a body over 64 KB gets 413 from its Content-Length or, chunked, as it grows; uploads are off."""
    from gradio_client import Client

    dave, pid = new_annotator(server, "dave")
    long_reason = "x" * 2001
    assert dave.post("/label/api/vote", json={"presentation_id": pid, "choice": "left",
                                              "reason": long_reason}).status_code == 422
    via_gradio = Client(server.url, auth=("dave", PASSWORD), verbose=False).predict(pid, "left", long_reason,
                                                                                    api_name="/vote")
    assert via_gradio["status"].startswith("Not saved: the reason is 2001 characters, at most 2000.")
    with store_of(server) as store:
        assert store.votes("dave") == []

    big = b'{"presentation_id": "' + b"x" * (64 * 1024) + b'", "choice": "left"}'
    declared = dave.post("/label/api/vote", content=big, headers={"Content-Type": "application/json"})
    assert declared.status_code == 413

    def chunks():
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]

    chunked = dave.post("/label/api/vote", content=chunks(), headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413
    parts = [b'{"presentation_id": "', pid.encode(), b'", "choice": "left"}']
    small = dave.post("/label/api/vote", content=iter(parts), headers={"Content-Type": "application/json"})
    assert small.status_code == 200 and small.json()["status"] == "Saved."  # a chunked body under the limit is read
    upload = dave.post("/gradio_api/upload", files={"files": ("a.txt", b"hello")})
    assert upload.status_code == 403


def test_exports_are_for_admins_deleted_once_downloaded_or_after_an_hour(server):
    """Gradio serves an export through its file route from a cached copy: that route is for admins alone (the
    annotator page has no file); an export downloaded whole is deleted, ours and the cached copy, and so is one
    an hour old that nobody fetched."""
    import glob
    import os

    from gradio_client import Client

    admin = Client(server.url, auth=("root", ADMIN_PASSWORD), verbose=False, download_files=False)

    def export_now() -> tuple[str, str]:
        data = admin.predict("raw", 1, 0, api_name="/export")  # not downloaded: the server's cached path
        cached = data["path"] if isinstance(data, dict) else data.path
        folder = Path(cached).parents[2]  # the server's own: <tmp>/align-label-*/gradio/<hash>/<name>
        assert folder.name.startswith("align-label-") and Path(cached).parents[1].name == "gradio"
        [ours] = glob.glob(f"{folder}/exports/{os.path.basename(cached)}")
        return cached, ours

    cached, ours = export_now()
    url = f"/gradio_api/file={cached}"
    ann = logged_in_client(server.url, "ann")
    refused = ann.get(url)
    assert refused.status_code == 403 and "admins only" in refused.text
    assert os.path.exists(cached) and os.path.exists(ours)
    root = httpx.Client(base_url=server.url)
    assert root.post("/login", data={"username": "root", "password": ADMIN_PASSWORD}).status_code == 200
    content = open(ours, "rb").read()
    served = root.get(url)
    assert served.status_code == 200 and served.content == content and b'"annotator"' in content
    deadline = time.monotonic() + 10  # deleted once the response has gone out, just after the client has it
    while (os.path.exists(ours) or os.path.exists(cached)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(ours) and not os.path.exists(cached)  # downloaded once: gone
    assert root.get(url).status_code != 200

    time.sleep(1.1)  # export names carry the second
    cached, ours = export_now()
    for path in (ours, cached):
        hour_ago = os.path.getmtime(path) - 3700
        os.utime(path, (hour_ago, hour_ago))
    assert ann.get(f"/gradio_api/file={cached}").status_code == 403  # any file request sweeps first
    assert not os.path.exists(ours) and not os.path.exists(cached)

    # no Python exception text: arguments of the wrong type are refused before Gradio runs anything (422,
    # access.ENDPOINTS), and gradio_client shows which and why
    for args, why in ((("preferences", None, 0.5), "- min_votes: expected a number"),
                      (("../../x", 1, 0.5), "- kind: expected one of preferences, raw, kto")):
        with pytest.raises(Exception, match=re.escape(why)):
            admin.predict(*args, api_name="/export")

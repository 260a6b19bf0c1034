"""The annotator's page in headless Chromium (Debian's, driven by Playwright): scripts in responses
stay text, and a keyboard shortcut casts a real vote."""

import shutil
from pathlib import Path

import pytest

from labeling_app.loadtest import PASSWORD, ServerProcess, seed_database
from labeling_app.store import LabelStore, NewPair

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync"]

playwright = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed "
                                 "(pip install playwright; the browser is Debian's chromium, no download)")
if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
    pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)", allow_module_level=True)

# Each payload sets window.__xss if it ever runs.
HOSTILE = [
    NewPair("Which is safer? <svg onload=\"window.__xss='prompt'\"></svg>",
            "Plain answer <script>window.__xss='script'</script> with **markdown**.",
            "Other answer <img src=x onerror=\"window.__xss='img'\">"),
    NewPair("Second question", "[click me](javascript:window.__xss='link')",
            "<iframe srcdoc=\"<script>parent.__xss='iframe'</script>\"></iframe> ${window.__xss='template'}"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    db = tmp_path_factory.mktemp("label-browser") / "labels.sqlite"
    seed_database(db, ["ann"], pairs=0)
    with LabelStore(db) as store:
        store.add_pairs(HOSTILE)
    with ServerProcess(db, overlap=1, extra=["--order", "fifo"]) as running:  # the pairs in the order written
        yield running


@pytest.fixture
def page(server):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        dialogs = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(server.url)
        page.locator("input").first.wait_for(timeout=30_000)
        page.locator("input").first.fill("ann")
        page.locator("input[type=password]").fill(PASSWORD)
        page.keyboard.press("Enter")
        page.locator("#response-left .response").wait_for(timeout=30_000)
        page.dialogs = dialogs
        yield page
        browser.close()


def assert_nothing_ran(page):
    assert page.evaluate("window.__xss") is None and page.dialogs == []
    assert page.evaluate("document.querySelectorAll('#prompt *:is(script, img, svg, iframe), "
                         ".response *:is(script, img, svg, iframe)').length") == 0
    hrefs = page.evaluate("[...document.querySelectorAll('.response a')].map(a => a.getAttribute('href'))")
    assert not any(h and h.lower().startswith("javascript:") for h in hrefs)


def test_html_in_responses_is_shown_as_text_and_never_runs_and_keys_vote(server, page, tmp_path):
    assert_nothing_ran(page)
    shown = page.inner_text("#prompt") + page.inner_text("#response-left") + page.inner_text("#response-right")
    assert "<script>window.__xss='script'</script>" in shown and "<img src=x onerror=" in shown  # as text
    assert "<svg onload=" in shown
    assert page.locator(".response strong").count() == 1  # markdown still renders

    # Typing in the reason box must not trigger shortcuts; then "1" (outside it) votes for the left response.
    page.fill("#reason textarea", "12 left is plainer")
    page.locator("#prompt").click()
    left_text = page.inner_text("#response-left")
    page.keyboard.press("1")
    page.wait_for_function("document.querySelector('#status').innerText.includes('Saved')", timeout=15_000)
    page.locator("#response-left .response").wait_for()
    assert "Second question" in page.inner_text("#prompt")
    assert_nothing_ran(page)
    screenshot = tmp_path / "labeling-page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 10_000

    with LabelStore(server.db) as store:
        (vote,) = store.votes("ann")
        pair = next(p for p in store.pairs() if p.id == vote.pair_id)
    assert vote.reason == "12 left is plainer" and vote.picked_side == "left"
    chosen = pair.response_a if vote.choice == "a" else pair.response_b
    assert chosen.split("<")[0].strip() in left_text  # the response that was on the left won

    page.keyboard.press("u")  # undo brings the first pair back
    page.wait_for_function("document.querySelector('#status').innerText.includes('undone')", timeout=15_000)
    assert "Which is safer?" in page.inner_text("#prompt")
    with LabelStore(server.db) as store:
        assert store.votes("ann") == []


def test_an_admin_exports_in_the_browser_and_the_file_goes_once_downloaded(server, tmp_path):
    """The admin tab's Export shows the file without fetching it (so it is still there to download); the
    download gets the votes, and the export is deleted on the server right after."""
    import glob
    import os
    import time

    from labeling_app.client import LabelingClient
    from labeling_app.passwords import hash_password

    with LabelStore(server.db) as store:
        if store.user("boss") is None:
            store.add_user("boss", hash_password("boss-password-1"), is_admin=True)
    ann = LabelingClient(server.url, "ann", PASSWORD)  # one vote, so there is something to export
    ann.login()
    ann.load()
    ann.vote("right")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        page.goto(server.url)
        page.locator("input").first.wait_for(timeout=30_000)
        page.locator("input").first.fill("boss")
        page.locator("input[type=password]").fill("boss-password-1")
        page.keyboard.press("Enter")
        page.get_by_role("tab", name="Admin").click(timeout=30_000)
        page.get_by_label("raw").check()
        page.get_by_role("button", name="Export").click()
        link = page.locator("a[download]").first
        link.wait_for(timeout=30_000)
        name = os.path.basename(link.get_attribute("href").split("file=", 1)[1])
        time.sleep(1.0)  # had the page fetched it to show it, the export would be gone by now
        assert glob.glob(f"/tmp/align-label-*/exports/{name}")
        with page.expect_download(timeout=30_000) as download:
            link.click()
        saved = tmp_path / name
        download.value.save_as(saved)
        browser.close()
    rows = [line for line in saved.read_text().splitlines() if line.strip()]
    assert rows and all('"annotator": "ann"' in r for r in rows)
    deadline = time.monotonic() + 10
    while glob.glob(f"/tmp/align-label-*/exports/{name}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not glob.glob(f"/tmp/align-label-*/exports/{name}")

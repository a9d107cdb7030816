"""The review UI in a real browser: Debian's Chromium driven by Playwright, against a
real `segloop serve` on a real store. Screenshots go to test-artifacts/ui/."""

from __future__ import annotations

import shutil
import sqlite3

import numpy as np
import pytest

from tests.conftest import ROOT, run_cli
from tests.test_review import TILE, Server, add_user, labels

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip(
        "Debian's chromium is not installed (make install installs it)", allow_module_level=True
    )
if not (ROOT / "review_ui/node_modules/openseadragon").is_dir():
    pytest.skip("review_ui/node_modules missing (make install runs npm)", allow_module_level=True)

ARTIFACTS = ROOT / "test-artifacts" / "ui"
VIEWPORT = {"width": 1100, "height": 800}
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def site(slide, tmp_path_factory):
    store = tmp_path_factory.mktemp("ui") / "slide.zarr"
    proc = run_cli("segment", slide[0], "-o", store, "--tile", str(TILE), "--quiet")
    assert proc.returncode == 0, proc.stderr
    tokens = {r: add_user(store, r, r) for r in ("viewer", "reviewer", "annotator")}
    tokens["reviewer2"] = add_user(store, "reviewer2", "reviewer")
    server = Server(store)
    yield {"store": store, "server": server, "tokens": tokens}
    server.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def open_page(browser, site, role: str, context=None):
    page = context.new_page() if context else browser.new_page(viewport=VIEWPORT)
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{site['server'].base}/?token={site['tokens'][role]}")
    page.wait_for_function("document.getElementById('status').textContent === 'ready'")
    return page, errors


def wait_tiles(page) -> None:
    """Until both layers (image and overlay) have drawn every tile in view."""
    page.wait_for_load_state("networkidle")
    page.wait_for_function(
        "() => state.seg && state.seg.getFullyLoaded()"
        " && state.viewer.world.getItemAt(0).getFullyLoaded()"
    )
    page.wait_for_timeout(300)  # let the last tiles blend in before a screenshot


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def test_loads_without_errors_and_fetches_tiles(browser, site):
    fetched: list[str] = []
    page = browser.new_page(viewport=VIEWPORT)
    page.on("response", lambda r: fetched.append(r.url) if "/tiles/" in r.url else None)
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(f"{site['server'].base}/?token={site['tokens']['reviewer']}")
    page.wait_for_function("document.getElementById('status').textContent === 'ready'")
    wait_tiles(page)
    assert "token=" not in page.url, "the token must leave the address bar"
    assert any("/tiles/image/" in u for u in fetched)
    assert any("/tiles/segmentation/" in u for u in fetched)
    before = len(fetched)
    page.mouse.move(550, 420)
    page.mouse.wheel(0, -600)  # zoom in: finer levels are fetched
    wait_tiles(page)
    assert len(fetched) > before
    shot(page, "01-loaded")
    assert errors == []
    page.close()


def test_brush_stroke_reaches_the_store_and_undo_restores_it(browser, site):
    page, errors = open_page(browser, site, "reviewer")
    wait_tiles(page)
    before = labels(site["store"])
    page.get_by_test_id("tool-brush").click()
    page.get_by_test_id("size").fill("30")
    page.get_by_test_id("class").select_option("2")
    box = page.get_by_test_id("viewer").bounding_box()
    x0, y0 = box["x"] + box["width"] * 0.45, box["y"] + box["height"] * 0.5
    page.mouse.move(x0, y0)
    page.mouse.down()
    for k in range(1, 11):
        page.mouse.move(x0 + 8 * k, y0 + 3 * k)
    page.mouse.up()
    page.wait_for_function("document.getElementById('status').textContent.startsWith('saved')")
    after = labels(site["store"])
    changed = after != before
    assert changed.sum() > 100 and set(np.unique(after[changed])) == {2}
    wait_tiles(page)
    shot(page, "02-brush-stroke")
    page.get_by_test_id("undo").click()
    page.wait_for_function("document.getElementById('status').textContent === 'undo done'")
    np.testing.assert_array_equal(labels(site["store"]), before)
    assert errors == []
    page.close()


def test_next_tile_and_accept_update_the_database(browser, site):
    page, errors = open_page(browser, site, "reviewer")
    page.get_by_test_id("next-tile").click()
    page.wait_for_function("document.getElementById('status').textContent.startsWith('tile')")
    page.get_by_test_id("accept").click()
    page.wait_for_function("document.getElementById('status').textContent.endsWith('accepted')")
    wait_tiles(page)
    shot(page, "03-next-tile-accepted")
    with sqlite3.connect(site["store"] / "segloop" / "review.sqlite") as db:
        states = db.execute("SELECT state FROM review").fetchall()
    assert ("accepted",) in states
    assert errors == []
    page.close()


def stroke(page, fx: float, fy: float, dx: float, dy: float, label: str, size: str = "20"):
    """Drag a brush stroke from (fx, fy) (fractions of the viewer) by (dx, dy) px."""
    page.get_by_test_id("tool-brush").click()
    page.get_by_test_id("size").fill(size)
    page.get_by_test_id("class").select_option(label)
    box = page.get_by_test_id("viewer").bounding_box()
    x0, y0 = box["x"] + box["width"] * fx, box["y"] + box["height"] * fy
    page.mouse.move(x0, y0)
    page.mouse.down()
    for k in range(1, 11):
        page.mouse.move(x0 + dx * k / 10, y0 + dy * k / 10)
    page.mouse.up()


def status_starts(page, text: str) -> None:
    page.wait_for_function(
        f"document.getElementById('status').textContent.startsWith({text!r})", timeout=30_000
    )


def test_reload_resends_an_unacknowledged_edit(browser, site):
    """The stroke's POST never reaches the server (connection lost): the edit waits in
    IndexedDB; after a reload the UI sends it, once."""
    context = browser.new_context(viewport=VIEWPORT)
    page, errors = open_page(browser, site, "reviewer", context)
    wait_tiles(page)
    before = labels(site["store"])
    page.route(
        "**/edits",
        lambda route: route.abort() if route.request.method == "POST" else route.continue_(),
    )
    stroke(page, 0.3, 0.3, 60, 20, "2")
    status_starts(page, "offline")
    assert page.evaluate("outbox.all().then((r) => r.length)") == 1
    np.testing.assert_array_equal(labels(site["store"]), before)  # nothing reached it
    page.unroute("**/edits")
    page.reload()
    status_starts(page, "saved")
    after = labels(site["store"])
    assert (after != before).sum() > 100
    assert page.evaluate("outbox.all().then((r) => r.length)") == 0
    page.reload()  # nothing left to send: no second copy of the edit
    page.wait_for_function("document.getElementById('status').textContent === 'ready'")
    page.wait_for_timeout(500)
    with sqlite3.connect(site["store"] / "segloop" / "review.sqlite") as db:
        n = db.execute("SELECT COUNT(*) FROM edits WHERE client_id IS NOT NULL").fetchone()[0]
        ids = db.execute("SELECT COUNT(DISTINCT client_id) FROM edits").fetchone()[0]
    assert n == ids  # every client edit stored once
    assert [e for e in errors if "Failed to load resource" not in e] == []
    context.close()


def test_two_editors_on_one_tile_409_is_rebased(browser, site):
    """B's live updates are cut, so B draws on versions A already replaced: the server
    answers 409, B's page rebases and re-sends; the store holds both strokes."""
    ctx_a, ctx_b = (browser.new_context(viewport=VIEWPORT) for _ in range(2))
    page_a, _ = open_page(browser, site, "reviewer", ctx_a)
    ctx_b.route_web_socket("**/live*", lambda ws: None)  # B hears nothing from the server
    page_b, errors_b = open_page(browser, site, "reviewer2", ctx_b)
    seen: list[int] = []
    page_b.on(
        "response",
        lambda r: (
            seen.append(r.status)
            if r.url.endswith("/edits") and r.request.method == "POST"
            else None
        ),
    )
    wait_tiles(page_a)
    wait_tiles(page_b)
    stroke(page_a, 0.55, 0.6, 80, 0, "2")
    status_starts(page_a, "saved")
    stroke(page_b, 0.58, 0.55, 0, 60, "1")
    status_starts(page_b, "saved")
    assert seen[:2] == [409, 200], seen
    with sqlite3.connect(site["store"] / "segloop" / "review.sqlite") as db:
        rows = db.execute(
            "SELECT u.name FROM edits e JOIN users u ON u.id = e.user_id ORDER BY e.id DESC LIMIT 2"
        ).fetchall()
    assert [r[0] for r in rows] == ["reviewer2", "reviewer"]
    wait_tiles(page_b)
    shot(page_b, "05-rebased-after-409")
    assert [e for e in errors_b if "409" not in e] == []
    ctx_a.close()
    ctx_b.close()


def test_edit_list_and_coverage_minimap(browser, site):
    """An annotator's proposal shows in the reviewer's list with its author; approving it
    there marks it approved; the minimap counts accepted tiles."""
    import requests

    r = requests.post(
        f"{site['server'].base}/api/images/slide/edits",
        json={"op": "brush", "points": [[900, 900], [950, 920]], "radius": 10, "label": 2},
        headers={"Authorization": f"Bearer {site['tokens']['annotator']}"},
        timeout=30,
    )
    edit_id = r.json()["edit_id"]
    page, errors = open_page(browser, site, "reviewer")
    item = page.get_by_test_id(f"edit-{edit_id}")
    item.wait_for()
    assert "annotator" in item.inner_text() and "proposed" in item.inner_text()
    page.get_by_test_id(f"approve-{edit_id}").click()
    status_starts(page, f"edit {edit_id} approved")
    with sqlite3.connect(site["store"] / "segloop" / "review.sqlite") as db:
        status = db.execute("SELECT status FROM edits WHERE id = ?", (edit_id,)).fetchone()[0]
    assert status == "approved"
    page.get_by_test_id("next-tile").click()
    status_starts(page, "tile")
    page.get_by_test_id("accept").click()
    page.wait_for_function(
        "JSON.parse(document.getElementById('coverage').dataset.counts || '{}').accepted >= 1"
    )
    wait_tiles(page)
    shot(page, "06-edit-list-and-coverage")
    assert errors == []
    page.close()


def test_viewer_role_sees_no_edit_tools(browser, site):
    page, errors = open_page(browser, site, "viewer")
    assert page.get_by_test_id("tool-brush").count() == 0
    assert page.get_by_test_id("undo").count() == 0
    assert page.get_by_test_id("opacity").count() == 1
    assert errors == []
    page.close()


def test_overlay_opacity_slider(browser, site):
    page, _ = open_page(browser, site, "reviewer")
    wait_tiles(page)
    page.get_by_test_id("opacity").fill("0")
    opacity = page.evaluate("state.seg.getOpacity()")
    assert opacity == 0
    page.close()


def test_store_name_with_hash_and_space_is_url_encoded(browser, site, tmp_path):
    """A store folder named ``a#b c.zarr``: tiles, the WebSocket and an edit all reach the
    image (unencoded, ``#`` would cut the WebSocket URL into a fragment)."""
    store = tmp_path / "a#b c.zarr"
    shutil.copytree(site["store"], store)
    server = Server(store)
    try:
        fetched: list[str] = []
        page = browser.new_page(viewport=VIEWPORT)
        page.on("response", lambda r: fetched.append(r.url) if "/tiles/" in r.url else None)
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{server.base}/?token={site['tokens']['reviewer']}")
        page.wait_for_function("document.getElementById('status').textContent === 'ready'")
        page.wait_for_function("state.ws && state.ws.readyState === WebSocket.OPEN")
        wait_tiles(page)
        assert any("/api/images/a%23b%20c/tiles/segmentation/" in u for u in fetched), fetched
        page.get_by_test_id("tool-brush").click()
        box = page.get_by_test_id("viewer").bounding_box()
        x0, y0 = box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5
        page.mouse.move(x0, y0)
        page.mouse.down()
        page.mouse.move(x0 + 20, y0 + 5)
        page.mouse.up()
        page.wait_for_function("document.getElementById('status').textContent.startsWith('saved')")
        assert errors == []
        page.close()
    finally:
        server.stop()

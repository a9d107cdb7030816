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
    tokens = {r: add_user(store, r, r) for r in ("viewer", "reviewer")}
    server = Server(store)
    yield {"store": store, "server": server, "tokens": tokens}
    server.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def open_page(browser, site, role: str):
    page = browser.new_page(viewport={"width": 1100, "height": 800})
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
    page = browser.new_page(viewport={"width": 1100, "height": 800})
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
    with sqlite3.connect(site["store"] / "review.sqlite") as db:
        states = db.execute("SELECT state FROM review").fetchall()
    assert ("accepted",) in states
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

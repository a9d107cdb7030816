"""The review UI's side of continuous learning (``segloop serve --learn``) in a real
browser against a real server, store and learner process (``tests/test_learn.py``'s
Session): the model indicator, the notice of an update, the marks on re-predicted tiles
until they are looked at, and the rollback control. Every wait is on a condition: a
round takes 10-20 s here, far longer on a loaded machine. Screenshots go to
test-artifacts/ui/."""

from __future__ import annotations

import shutil

import pytest

from tests.test_learn import FAST, Session
from tests.test_review import Server, add_user
from tests.test_ui import VIEWPORT, browser, open_page, shot, status_starts, wait_tiles  # noqa: F401

expect = pytest.importorskip("playwright.sync_api").expect
LONG = 300_000  # ms: a learning round on a busy 2-core machine


@pytest.fixture(scope="module")
def session(base_store, tmp_path_factory):
    """``serve --learn --every 1`` with short rounds; a reviewer, an annotator, a viewer."""
    s = Session(base_store, tmp_path_factory.mktemp("ui_learn"), "--every", "1", *FAST)
    s.tokens["viewer"] = add_user(s.store, "viewer", "viewer")
    yield s
    s.stop()


def site(s: Session) -> dict:
    return {"server": s.server, "tokens": s.tokens}


def wait_marks(page, n: int) -> None:
    """Until the main view marks ``n`` tiles as re-predicted and not looked at yet."""
    page.wait_for_function(
        f"Number(document.querySelector('canvas.marks')?.dataset.tiles || 0) === {n}",
        timeout=60_000,
    )


def updated_tiles(s: Session, kind: str) -> list[str]:
    """The distinct tiles (as "ty/tx") the updates of ``kind`` re-predicted, oldest first."""
    out: dict[str, None] = {}
    for u in s.call("GET", "/model/updates?after=0")["updates"]:
        if u["kind"] == kind:
            out.update({f"{ty}/{tx}": None for ty, tx in u["tiles"]})
    return list(out)


def in_view(page, key: str) -> bool:
    """Whether the view's centre lies in level-0 tile ``key`` ("ty/tx")."""
    ty, tx = map(int, key.split("/"))
    return page.evaluate(
        f"(() => {{ const p = base().viewportToImageCoordinates(state.viewer.viewport"
        f".getCenter(true)), t = state.meta.tile; return Math.floor(p.y / t) === {ty}"
        f" && Math.floor(p.x / t) === {tx}; }})()"
    )


def test_without_learn_the_header_shows_the_model_version(browser, base_store, tmp_path):  # noqa: F811
    store = tmp_path / "slide.zarr"
    shutil.copytree(base_store, store)
    token = add_user(store, "reviewer", "reviewer")
    server = Server(store)
    try:
        page, errors = open_page(
            browser, {"server": server, "tokens": {"reviewer": token}}, "reviewer"
        )
        expect(page.get_by_test_id("model")).to_have_text("model v1")
        assert page.get_by_test_id("model-panel").is_hidden()
        assert page.get_by_test_id("update-notice").is_hidden()
        assert errors == []
        page.close()
    finally:
        server.stop()


def test_a_round_is_announced_marked_and_rolled_back(browser, session):  # noqa: F811
    s = session
    context = browser.new_context(viewport=VIEWPORT)
    page, errors = open_page(browser, site(s), "reviewer", context)
    wait_tiles(page)
    page.wait_for_function("state.ws && state.ws.readyState === WebSocket.OPEN")
    model = page.get_by_test_id("model")
    expect(model).to_have_text("model v1")
    assert page.get_by_test_id("rollback-box").is_hidden()  # nothing older to serve yet
    page.evaluate(  # every text the indicator shows, to see the round's own
        "window.modelTexts = []; new MutationObserver(() => modelTexts.push("
        "document.getElementById('model').textContent)).observe("
        "document.getElementById('model'), {childList: true, characterData: true, subtree: true})"
    )

    page.get_by_test_id("layer-confidence").check()  # the heatmap follows the new model
    page.wait_for_function("state.heat && state.heat !== 'loading' && state.heat.getFullyLoaded()")
    heat: list[str] = []
    page.on("request", lambda r: heat.append(r.url) if "/tiles/confidence/" in r.url else None)

    s.call("PUT", "/review/1/1", json={"state": "accepted"})  # K = 1: a round starts
    s.wait(lambda m: m["served"]["version"] == 2 and s.idle(m), timeout=LONG / 1000)
    learned = updated_tiles(s, "learned")
    assert learned
    n = len(learned)
    expect(model).to_contain_text("model v2 · IoU ", timeout=60_000)
    expect(model).not_to_contain_text("learning", timeout=60_000)
    assert any("model v1 · learning v2…" in t for t in page.evaluate("modelTexts"))
    notice = page.get_by_test_id("update-text")
    expect(notice).to_have_text(f"model v2 updated {n} tile{'s' if n > 1 else ''}", timeout=60_000)
    wait_marks(page, n)
    assert page.get_by_test_id("update-notice").is_visible()
    # the confidence events went to the heatmap (its tiles fetched again, at their new
    # versions), not to the labels' versions
    assert page.evaluate("Object.keys(state.confVersions).length") > 0
    page.wait_for_function("state.heat.getFullyLoaded()", timeout=60_000)
    assert any(u.endswith("?v=1") for u in heat), heat
    assert "trained on" in page.get_by_test_id("model-detail").inner_text()
    shot(page, "learn-01-updated")

    # the notice takes the viewer to the updated tiles; looked at, a tile loses its mark
    page.get_by_test_id("update-show").click()
    page.wait_for_function(f"!updates.marks.has({learned[0]!r})", timeout=60_000)
    assert in_view(page, learned[0])
    wait_marks(page, n - 1)
    if n > 1:
        expect(page.get_by_test_id("update-next")).to_have_text(f"next (1/{n})")
        page.get_by_test_id("update-next").click()
        page.wait_for_function(f"!updates.marks.has({learned[1]!r})", timeout=60_000)
        assert in_view(page, learned[1])
        wait_marks(page, n - 2)
    shot(page, "learn-02-shown")
    # what was seen is remembered (localStorage, per image and user)
    left = max(0, n - 2)
    page.reload()
    page.wait_for_function("document.getElementById('status').textContent === 'ready'")
    wait_marks(page, left)
    if left:
        expect(notice).to_have_text(
            f"{left} tile{'s' if left > 1 else ''} updated since you last looked"
        )

    # roll back to v1 through the UI
    expect(page.get_by_test_id("rollback-box")).to_be_visible()
    page.get_by_test_id("rollback-version").select_option("1")
    page.once("dialog", lambda d: d.accept())
    page.get_by_test_id("rollback").click()
    status_starts(page, "rolled back to v1: v2 retired")
    expect(model).to_have_text("model v1", timeout=LONG)
    s.wait(s.idle, timeout=LONG / 1000)
    restored = updated_tiles(s, "rollback")
    m = len(restored)
    expect(notice).to_have_text(
        f"rolled back to v1: {m} tile{'s' if m > 1 else ''} restored", timeout=60_000
    )
    wait_marks(page, len(set(restored) | set(learned[2:])))
    assert page.get_by_test_id("rollback-box").is_hidden()  # v2 is retired: nothing older
    shot(page, "learn-03-rolled-back")
    page.get_by_test_id("update-dismiss").click()  # acknowledges every update
    wait_marks(page, 0)
    assert page.get_by_test_id("update-notice").is_hidden()
    page.reload()
    page.wait_for_function("document.getElementById('status').textContent === 'ready'")
    expect(model).to_have_text("model v1")
    page.evaluate("updates.chain.then(() => 1)")  # the updates since: none
    assert (
        page.evaluate("updates.marks.size") == 0
        and page.get_by_test_id("update-notice").is_hidden()
    )
    assert errors == []
    context.close()


def test_a_viewer_sees_the_model_but_no_rollback(browser, session):  # noqa: F811
    page, errors = open_page(browser, site(session), "viewer")
    expect(page.get_by_test_id("model")).to_contain_text("model v", timeout=30_000)
    expect(page.get_by_test_id("model-panel")).to_be_visible()
    assert page.get_by_test_id("rollback").count() == 0
    assert page.get_by_test_id("rollback-version").count() == 0
    # a first visit marks nothing: there is no "since you last looked" yet
    page.evaluate("updates.chain.then(() => 1)")
    assert page.evaluate("updates.marks.size") == 0
    assert page.get_by_test_id("update-notice").is_hidden()
    assert page.evaluate("JSON.parse(localStorage.getItem('segloop-seen-slide-viewer')).after") > 0
    assert errors == []
    page.close()

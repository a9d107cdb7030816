"""The review server under hostile but legal use (issue 16): a real server process on a
real store and SQLite database. Each test reproduces one finding; none waits on a fixed
sleep or asserts a duration."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import sqlite3
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import requests

from segloop.triton.server import free_port
from tests.conftest import TILE, assert_user_error, run_cli
from tests.test_review import Server, add_user, call, grow_review_db, labels

EDITS = "/api/images/slide/edits"
H, W = 1500, 1300  # the test slide


def _env(store: Path, server: Server, tokens: dict[str, str]) -> dict:
    return {"store": store, "server": server, "tokens": tokens}


@pytest.fixture(scope="module")
def env(base_store, tmp_path_factory):
    """A private copy of the store, its users and a running server."""
    store = tmp_path_factory.mktemp("hostile") / "slide.zarr"
    shutil.copytree(base_store, store)
    tokens = {r: add_user(store, r, r) for r in ("viewer", "annotator", "reviewer", "admin")}
    tokens["reviewer2"] = add_user(store, "reviewer2", "reviewer")
    server = Server(store, env={"SEGLOOP_METRICS_TOKEN": "scrape-me"})
    yield _env(store, server, tokens)
    server.stop()


def _rss_peak_mb(server: Server) -> float:
    """The server process's peak resident memory (VmHWM), MB."""
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    line = next(ln for ln in status.splitlines() if ln.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


# --- 1. a locked database ---------------------------------------------------------------


def test_locked_database_answers_503_then_serves_normally(base_store, tmp_path):
    """Another process holds BEGIN IMMEDIATE: edits, undo and review writes get 503 with a
    Retry-After (no hang, health answers); once the lock is gone everything works, and
    SIGTERM still stops the server."""
    store = tmp_path / "slide.zarr"
    shutil.copytree(base_store, store)
    env = {"tokens": {"reviewer": add_user(store, "reviewer", "reviewer")}}
    env["server"] = server = Server(store, no_tile_pack=True)
    stroke = {"op": "brush", "points": [[40, 40]], "label": 2, "radius": 4}
    assert call(env, "POST", EDITS, json=stroke).status_code == 200
    other = sqlite3.connect(store / "segloop" / "review.sqlite", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with ThreadPoolExecutor(4) as pool:
            jobs = [
                pool.submit(call, env, "POST", EDITS, json={**stroke, "points": [[90, 90]]}),
                pool.submit(call, env, "POST", "/api/images/slide/undo"),
                pool.submit(
                    call, env, "PUT", "/api/images/slide/review/0/0", json={"state": "accepted"}
                ),
                pool.submit(call, env, "POST", "/api/images/slide/queue/next"),
            ]
            health = requests.get(server.base + "/api/health", timeout=30)
            answers = [j.result() for j in jobs]
        assert health.status_code == 200
        for r in answers:
            assert r.status_code == 503, r.text
            assert "locked" in r.json()["error"] and int(r.headers["Retry-After"]) >= 1
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert call(env, "POST", EDITS, json={**stroke, "points": [[90, 90]]}).status_code == 200
    assert call(env, "POST", "/api/images/slide/undo").status_code == 200
    r = call(env, "PUT", "/api/images/slide/review/0/0", json={"state": "accepted"})
    assert r.status_code == 200
    assert labels(store)[40, 40] == 2
    server.stop()  # waits for the exit: SIGTERM is honoured
    assert server.proc.returncode is not None


# --- 2./3. bounded rasterisation --------------------------------------------------------


def _zigzag(n: int, seed: int = 0) -> list[list[int]]:
    """n points alternating between the left and right border, at random rows."""
    rng = np.random.default_rng(seed)
    ys = rng.integers(0, H, n)
    return [[0 if k % 2 == 0 else W - 1, int(y)] for k, y in enumerate(ys)]


def test_worst_polygon_and_stroke_are_bounded_and_never_stall_health(env):
    """The largest allowed polygon (10 000 corners) and a 2 000-point zig-zag stroke are
    painted exactly; health answers while they run; the server's peak memory stays small;
    a stroke over the per-edit budget gets 413 before any work."""
    rng = np.random.default_rng(1)
    angles = np.sort(rng.uniform(0, 2 * np.pi, 10_000))
    radii = rng.uniform(50, 640, 10_000)
    corners = np.stack([650 + radii * np.cos(angles), 750 + radii * np.sin(angles)], 1)
    corners = np.clip(corners.round(), 0, [W - 1, H - 1]).astype(int).tolist()
    edits = [
        {"op": "polygon", "points": corners, "label": 1},
        {"op": "brush", "points": _zigzag(2000), "label": 2, "radius": 2},
    ]
    pings: list[tuple[float, float]] = []
    done = threading.Event()

    def ping() -> None:
        s = requests.Session()
        while not done.is_set():
            t0 = time.monotonic()
            assert s.get(env["server"].base + "/api/health", timeout=60).status_code == 200
            pings.append((t0, time.monotonic()))

    pinger = threading.Thread(target=ping)
    pinger.start()
    windows = []
    try:
        for edit in edits:
            t0 = time.monotonic()
            r = call(env, "POST", EDITS, json=edit)
            windows.append((t0, time.monotonic()))
            assert r.status_code == 200, r.text
            assert r.json()["changed_px"] > 0
    finally:
        done.set()
        pinger.join()
    # health was answered while an edit was being applied (sent after it, back before its
    # answer): the edits never held the event loop or the GIL throughout
    assert any(t0 < a and b < t1 for t0, t1 in windows for a, b in pings), "health stalled"
    lab = labels(env["store"])
    y, x = 750, 650  # the centre of the star polygon, inside it
    assert lab[y, x] in (1, 2)
    assert _rss_peak_mb(env["server"]) < 1024, "an edit took memory in proportion to its size"
    corners_to_corners = [[0, 0] if k % 2 == 0 else [W - 1, H - 1] for k in range(10_000)]
    huge = {"op": "brush", "points": corners_to_corners, "label": 1, "radius": 256}
    r = call(env, "POST", EDITS, json=huge)
    assert r.status_code == 413 and "too large" in r.json()["error"]


def test_polygon_fills_pixel_centres_inside(env):
    """Scanline fill: a triangle's inside pixels, none outside (checked against a
    point-in-polygon test of every pixel centre in its box)."""
    tri = [[300, 1100], [420, 1130], [340, 1230]]
    r = call(env, "POST", EDITS, json={"op": "polygon", "points": tri, "label": 2})
    assert r.status_code == 200
    lab = labels(env["store"])
    yy, xx = np.mgrid[1100:1231, 300:421]
    (ax, ay), (bx, by), (cx, cy) = tri

    def side(px, py, qx, qy):
        return (qx - px) * (yy - py) - (qy - py) * (xx - px)

    s1, s2, s3 = side(ax, ay, bx, by), side(bx, by, cx, cy), side(cx, cy, ax, ay)
    strictly_in = ((s1 > 0) & (s2 > 0) & (s3 > 0)) | ((s1 < 0) & (s2 < 0) & (s3 < 0))
    assert (lab[1100:1231, 300:421][strictly_in] == 2).all()


# --- 4. streaming stats -----------------------------------------------------------------


def test_stats_and_undo_never_read_delta_blobs(env):
    """The per-user aggregates and the undo stack are answered from covering indexes (no
    delta blob read); the agreement is computed one delta at a time and is right."""
    tile = [5, 0]  # tile 5/0: an annotator paints, a reviewer paints over part of it
    x0, y0 = tile[1] * TILE + 40, tile[0] * TILE + 40
    a = {"op": "brush", "points": [[x0, y0], [x0 + 60, y0]], "label": 1, "radius": 10}
    b = {"op": "brush", "points": [[x0, y0]], "label": 2, "radius": 5}
    assert call(env, "POST", EDITS, "annotator", json=a).status_code == 200
    assert call(env, "POST", EDITS, "reviewer", json=b).status_code == 200
    stats = call(env, "GET", "/api/images/slide/stats", "viewer").json()
    per_tile = {tuple(t["tile"]): t for t in stats["agreement"]["per_tile"]}
    got = per_tile[tuple(tile)]
    assert got["annotator"] == "annotator" and got["reviewer"] == "reviewer"
    assert got["changed_px"] > 0 and got["mean_iou"] < 1
    db = sqlite3.connect(env["store"] / "segloop" / "review.sqlite")
    plans = {
        "stats": "SELECT user_id, op, status, COUNT(*), SUM(pixels) FROM edits "
        "GROUP BY user_id, op, status",
        "undo": "SELECT id, op, undone FROM edits INDEXED BY edits_by_user WHERE user_id = 1 "
        "ORDER BY id DESC",
    }
    for name, sql in plans.items():
        plan = " ".join(r[-1] for r in db.execute("EXPLAIN QUERY PLAN " + sql))
        assert "COVERING INDEX" in plan, (name, plan)
    db.close()


# --- 5. roles ---------------------------------------------------------------------------


def _history(env, edit_ids: set[int]) -> dict[int, dict]:
    rows = call(env, "GET", EDITS + "?limit=1000", "viewer").json()
    return {r["id"]: r for r in rows if r["id"] in edit_ids}


def _other_label(env, x: int, y: int) -> int:
    return 1 if labels(env["store"])[y, x] != 1 else 2


def test_annotator_undo_redo_stays_a_proposal(env):
    label = _other_label(env, 1200, 200)
    stroke = {"op": "brush", "points": [[1200, 200]], "label": label, "radius": 6}
    ids = {call(env, "POST", EDITS, "annotator", json=stroke).json()["edit_id"]}
    for op in ("undo", "redo"):
        r = call(env, "POST", f"/api/images/slide/{op}", "annotator")
        assert r.status_code == 200 and r.json()["status"] == "proposed"
        ids.add(r.json()["edit_id"])
    hist = _history(env, ids)
    assert sorted(h["op"] for h in hist.values()) == ["brush", "redo", "undo"]
    assert {h["status"] for h in hist.values()} == {"proposed"}


def test_only_reviewers_give_verdicts(env):
    put = "/api/images/slide/review/{}/{}"
    r = call(env, "PUT", put.format(1, 4), "annotator", json={"state": "corrected"})
    assert r.status_code == 200 and r.json()["state"] == "correction_proposed"
    got = call(env, "GET", put.format(1, 4), "viewer").json()
    assert got["state"] == "correction_proposed"  # not trusted as expert work
    assert call(env, "PUT", put.format(1, 4), "reviewer", json={"state": "accepted"}).ok
    for state in ("unseen", "flagged", "in_review"):
        body = {"state": state, **({"reason": "unsure"} if state == "flagged" else {})}
        r = call(env, "PUT", put.format(1, 4), "annotator", json=body)
        assert r.status_code == 403 and "reviewer" in r.json()["error"]
    assert call(env, "GET", put.format(1, 4), "viewer").json()["state"] == "accepted"
    assert call(env, "PUT", put.format(1, 4), "reviewer2", json={"state": "corrected"}).ok


def test_a_proposal_is_decided_once(env):
    label = _other_label(env, 1000, 1400)
    stroke = {"op": "brush", "points": [[1000, 1400]], "label": label, "radius": 5}
    edit_id = call(env, "POST", EDITS, "annotator", json=stroke).json()["edit_id"]
    url = f"{EDITS}/{edit_id}/decision"
    with ThreadPoolExecutor(2) as pool:
        jobs = [
            pool.submit(call, env, "POST", url, who, json={"decision": d})
            for who, d in (("reviewer", "approve"), ("reviewer2", "reject"))
        ]
        codes = sorted(j.result().status_code for j in jobs)
    assert codes == [200, 409]
    again = call(env, "POST", url, json={"decision": "approve"})
    assert again.status_code == 409


def test_revoked_users_websocket_is_closed(env):
    token = add_user(env["store"], "leaver", "viewer")

    async def go() -> aiohttp.WSMessage:
        url = env["server"].base + f"/api/images/slide/live?token={token}"
        async with aiohttp.ClientSession() as s, s.ws_connect(url) as ws:
            proc = await asyncio.create_subprocess_exec(
                *run_cli_args("users", "revoke", "leaver", "--store", str(env["store"]))
            )
            assert await proc.wait() == 0
            while True:  # the server closes it (a few events may come first)
                msg = await asyncio.wait_for(ws.receive(), 60)
                if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                    return msg

    msg = asyncio.run(go())
    assert msg.data == 4401


def run_cli_args(*args: str) -> list[str]:
    return [sys.executable, "-m", "segloop", *args]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/images/slide/queue/release", {"tile": [2**70, 0]}),
        ("POST", "/api/images/slide/queue/release", {"tile": [-1, 0]}),
        ("POST", EDITS, {"op": "brush", "points": [[1, 1]], "label": 2**70}),
        ("POST", EDITS, {"op": "brush", "points": [[2**70, 1]], "label": 1}),
        ("POST", EDITS, {"op": "brush", "points": [[1, 1]], "radius": 2**70}),
        ("POST", EDITS, {"op": "brush", "points": [[1, 1]], "base": {"0/0": 2**70}}),
    ],
)
def test_huge_integers_are_400(env, method, path, body):
    r = call(env, method, path, json=body)
    assert r.status_code == 400 and "error" in r.json()


def test_huge_history_cursor_is_not_a_server_error(env):
    r = call(env, "GET", EDITS + f"?before={-(10**30)}")
    assert r.status_code == 200 and r.json() == []


# --- 6. start-up, disk, quota -----------------------------------------------------------


def test_damaged_or_truncated_database_is_refused_at_start(base_store, tmp_path):
    for damage in ("truncate", "scribble"):
        store = tmp_path / damage / "slide.zarr"
        shutil.copytree(base_store, store)
        add_user(store, "a", "admin")
        grow_review_db(store)
        path = store / "segloop" / "review.sqlite"
        raw = bytearray(path.read_bytes())
        if damage == "truncate":
            path.write_bytes(raw[: len(raw) // 2])
        else:  # a page in the middle overwritten
            page = 4096
            raw[3 * page : 4 * page] = b"\xa5" * page
            path.write_bytes(raw)
        proc = run_cli("serve", store, "--port", str(free_port()), timeout=120)
        assert_user_error(proc, "review.sqlite", "damaged")


def test_full_disk_and_edit_quota_answer_507(base_store, tmp_path):
    """A disk with less free space than the reserve → 507 "disk full"; a user past the
    edit quota → 507 naming the quota, while undo still works."""
    store = tmp_path / "slide.zarr"
    shutil.copytree(base_store, store)
    env = {"tokens": {"reviewer": add_user(store, "reviewer", "reviewer")}}
    stroke = {"op": "brush", "points": [[60, 60], [200, 60]], "label": 2, "radius": 20}
    env["server"] = Server(store, no_tile_pack=True, env={"SEGLOOP_MIN_FREE_MB": str(2**40)})
    try:
        r = call(env, "POST", EDITS, json=stroke)
        assert r.status_code == 507 and "disk full" in r.json()["error"]
    finally:
        env["server"].stop()
    env["server"] = Server(store, no_tile_pack=True, env={"SEGLOOP_EDIT_QUOTA_MB": "0.002"})
    try:
        small = {"op": "brush", "points": [[10, 300]], "label": 1, "radius": 2}
        assert call(env, "POST", EDITS, json=small).status_code == 200
        r = call(env, "POST", EDITS, json=stroke)
        assert r.status_code == 507 and "quota" in r.json()["error"]
        assert call(env, "POST", "/api/images/slide/undo").status_code == 200
    finally:
        env["server"].stop(signal.SIGTERM)


# --- 7. the web's basics ----------------------------------------------------------------


def test_errors_are_json_and_headers_are_safe(env):
    r = call(env, "GET", '/api/images/a"b')
    assert r.status_code == 404 and 'a"b' in r.json()["error"]
    r = call(env, "GET", "/no/such/route")
    assert r.status_code == 404 and r.headers["Content-Type"].startswith("application/json")
    r = call(env, "DELETE", "/api/health")
    assert r.status_code == 405 and "error" in r.json()
    page = call(env, "GET", "/", who=None)
    csp = page.headers["Content-Security-Policy"]
    assert (
        "frame-ancestors 'none'" in csp
        and "'sha256-" in csp
        and "'unsafe-inline'" not in csp.split("style-src")[0]
    )
    for r in (page, call(env, "GET", "/api/images")):
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["Referrer-Policy"] == "no-referrer"
    tile = call(env, "GET", "/api/images/slide/tiles/segmentation/0/0/0?v=0")
    assert tile.headers["Cache-Control"].startswith("private")


def test_token_in_query_only_for_the_websocket_and_json_bodies_only(env):
    token = env["tokens"]["viewer"]
    r = requests.get(env["server"].base + f"/api/images?token={token}", timeout=30)
    assert r.status_code == 401
    body = json.dumps({"op": "brush", "points": [[5, 5]], "label": 1})
    r = call(env, "POST", EDITS, data=body, headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]


def test_metrics_with_a_scrape_token(env):
    base = env["server"].base
    assert requests.get(base + "/metrics", timeout=30).status_code == 401
    r = requests.get(base + "/metrics", timeout=30, headers={"Authorization": "Bearer scrape-me"})
    assert r.status_code == 200 and "segloop_request_seconds_bucket" in r.text


def test_a_body_in_several_segments_is_read_whole(env):
    """A large edit body that reaches the server in two TCP segments is read to its end:
    the server must not decode the part that has arrived (a soak once got a bogus 400
    "malformed JSON" for the largest polygon)."""
    rng = np.random.default_rng(7)  # 3000 points in the image's bottom-right 64² corner
    points = (rng.integers(0, 64, (3000, 2)) + np.array([W - 64, H - 64])).tolist()
    body = json.dumps({"op": "brush", "points": points, "label": 1, "radius": 1})
    raw = body.encode()
    host, port = env["server"].base.removeprefix("http://").split(":")
    head = (
        f"POST {EDITS} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {env['tokens']['reviewer']}\r\n"
        f"Content-Length: {len(raw)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(head + raw[: len(raw) // 2])
        sock.settimeout(0.5)  # a server that answers now answered half a body
        try:
            early = sock.recv(65536)
        except TimeoutError:
            early = b""
        assert early == b"", early[:300]
        sock.settimeout(60)
        sock.sendall(raw[len(raw) // 2 :])
        answer = b""
        while part := sock.recv(65536):
            answer += part
    status = answer.split(b"\r\n", 1)[0]
    assert status.startswith(b"HTTP/1.1 200"), answer[:300]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["changed_px"] > 0

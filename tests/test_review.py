"""`segloop serve`: a real server process on a real store and SQLite database."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import requests
import zarr
from PIL import Image

from segloop.bench.process import ServerProcess
from segloop.pipeline.pyramid import downsample_mode
from segloop.review.edits import unpack
from segloop.review.tile_pack import LEGACY_NAME, pack_path
from tests.conftest import TILE, assert_user_error, run_cli


def add_user(store: Path, name: str, role: str) -> str:
    proc = run_cli("users", "add", name, "--role", role, "--store", store)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


class Server(ServerProcess):
    """`segloop serve STORE` on a free port, ready once ``/api/health`` answers."""

    def __init__(
        self,
        store: Path,
        port: int | None = None,
        no_tile_pack: bool = False,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
        more: tuple[Path, ...] = (),
    ) -> None:
        """``more``: further stores served beside ``store``."""
        flags = ["--no-tile-pack"] if no_tile_pack else []
        stores = [str(store), *map(str, more)]
        cmd = [sys.executable, "-m", "segloop", "serve", *stores, "--port", "{port}"]
        super().__init__([*cmd, *flags, *map(str, args)], port=port, env=env, timeout_s=60)


@pytest.fixture(scope="module")
def env(base_store, tmp_path_factory):
    """A private copy of the store, its users and a running server."""
    store = tmp_path_factory.mktemp("served") / "slide.zarr"
    shutil.copytree(base_store, store)
    tokens = {
        role: add_user(store, role, role) for role in ("viewer", "annotator", "reviewer", "admin")
    }
    tokens["reviewer2"] = add_user(store, "reviewer2", "reviewer")
    server = Server(store)
    yield {"store": store, "server": server, "tokens": tokens}
    server.stop()


def call(env, method: str, path: str, who: str = "reviewer", **kw) -> requests.Response:
    headers = kw.pop("headers", {})
    if who:
        headers["Authorization"] = f"Bearer {env['tokens'][who]}"
    return requests.request(method, env["server"].base + path, headers=headers, timeout=30, **kw)


def with_deltas(lab: np.ndarray, blobs: list[bytes]) -> np.ndarray:
    """Level-0 labels ``lab`` with the packed edit deltas ``blobs`` applied in order."""
    out = lab.copy()
    for blob in blobs:
        for key, (idx, _before, after) in unpack(blob).items():
            cy, cx = map(int, key.split("/"))
            chunk = out[cy * TILE : (cy + 1) * TILE, cx * TILE : (cx + 1) * TILE]
            flat = chunk.copy().reshape(-1)
            flat[idx] = after
            chunk[...] = flat.reshape(chunk.shape)
    return out


def grow_review_db(store: Path) -> None:
    """Fill the store's review database with 40 flagged tiles (long comments: several
    pages), checkpointed into the file: room to damage a page in the middle."""
    db = sqlite3.connect(store / "segloop" / "review.sqlite")
    db.executemany(
        "INSERT INTO review VALUES (?, ?, 'flagged', 'unsure', ?, 1, 0, NULL)",
        [(k, 0, "x" * 3000) for k in range(40)],
    )
    db.commit()
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def labels(store: Path, level: int = 0) -> np.ndarray:
    """The store's labels once every acknowledged edit is in zarr: the server writes the
    shards behind the answer and marks each edit applied (within about a second; 10 s at
    most here)."""
    wait_applied(store)
    return zarr.open_array(store / f"labels/segmentation/{level}", mode="r")[...]


def wait_applied(store: Path, timeout: float = 10) -> None:
    if not (store / "segloop" / "review.sqlite").exists():
        return
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(store / "segloop" / "review.sqlite") as db:
            pending = db.execute("SELECT count(*) FROM edits WHERE applied = 0").fetchone()[0]
        if not pending:
            return
        assert time.monotonic() < deadline, f"{pending} acknowledged edits not in zarr"
        time.sleep(0.01)


# --- auth and bad input -----------------------------------------------------------------


def test_health_is_public_everything_else_needs_a_token(env):
    assert call(env, "GET", "/api/health", who=None).json()["status"] == "ok"
    for path in (
        "/api/images",
        "/api/openapi.json",
        "/metrics",
        "/api/images/slide/tiles/segmentation/0/0/0",
    ):
        r = call(env, "GET", path, who=None)
        assert r.status_code == 401 and "token" in r.json()["error"]
    r = call(env, "GET", "/api/images", who=None, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401


def test_huge_numbers_are_not_server_errors(env):
    big = "9" * 30
    assert call(env, "GET", f"/api/images/slide/edits?before={big}").status_code == 200
    assert call(env, "GET", "/api/images/slide/edits?limit=-5").json() == []
    r = call(env, "POST", f"/api/images/slide/edits/{big}/decision", json={"decision": "approve"})
    assert r.status_code == 404
    assert call(env, "GET", f"/api/images/slide/tiles/image/0/{big}/0").status_code == 404


def test_roles_are_enforced(env):
    stroke = {"op": "brush", "points": [[10, 10]], "label": 1, "radius": 3}
    assert call(env, "POST", "/api/images/slide/edits", "viewer", json=stroke).status_code == 403
    accept = {"state": "accepted"}
    r = call(env, "PUT", "/api/images/slide/review/0/0", "annotator", json=accept)
    assert r.status_code == 403
    r = call(
        env, "POST", "/api/images/slide/edits/1/decision", "annotator", json={"decision": "approve"}
    )
    assert r.status_code == 403


@pytest.mark.parametrize(
    "path",
    [
        "/api/images/nope",
        "/api/images/slide/tiles/segmentation/9/0/0",
        "/api/images/slide/tiles/segmentation/0/99/0",
        "/api/images/slide/tiles/bogus/0/0/0",
        "/api/images/slide/tiles/segmentation/0/x/0",
        "/api/images/..%2F..%2Fetc/tiles/image/0/0/0",
        "/api/images/slide/review/-1/0",
        "/api/images/slide/../../etc/passwd",
    ],
)
def test_unknown_things_are_404(env, path):
    r = call(env, "GET", path)
    assert r.status_code == 404


@pytest.mark.parametrize(
    ("body", "status", "word"),
    [
        (b"{not json", 400, "malformed"),
        (json.dumps({"op": "brush", "points": "x"}).encode(), 400, "invalid"),
        (json.dumps({"op": "teleport", "points": [[1, 1]]}).encode(), 400, "invalid"),
        (json.dumps({"op": "brush", "points": [[1, 1]], "extra": 1}).encode(), 400, "invalid"),
        (json.dumps({"op": "brush", "points": [[99999, 1]], "label": 1}).encode(), 400, "outside"),
        (json.dumps({"op": "brush", "points": [[1, 1]], "label": 9}).encode(), 400, "label"),
        (json.dumps({"op": "brush", "points": [[1, 1]], "radius": 10**6}).encode(), 400, "radius"),
        (json.dumps({"op": "brush", "points": [[1, 1]] * 10001}).encode(), 400, "points"),
        (json.dumps({"op": "brush", "points": [[1, 1]] * 200_000}).encode(), 413, "larger"),
        (
            json.dumps({"op": "brush", "points": [[1, 1]], "base": {"../x": 1}}).encode(),
            400,
            "base keys",
        ),
    ],
)
def test_bad_edit_bodies(env, body, status, word):
    r = call(
        env,
        "POST",
        "/api/images/slide/edits",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == status, r.text
    assert word in r.json()["error"]


# --- tiles --------------------------------------------------------------------------------


def test_tiles_are_versioned_and_cacheable(env):
    path = "/api/images/slide/tiles/segmentation/0/1/1"
    r = call(env, "GET", path)
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/png"
    etag = r.headers["ETag"]
    assert call(env, "GET", path, headers={"If-None-Match": etag}).status_code == 304
    r = call(env, "GET", path + "?v=0")
    assert "immutable" in r.headers["Cache-Control"]
    raw = call(env, "GET", path, headers={"Accept": "application/octet-stream"})
    chunk = labels(env["store"])[TILE : 2 * TILE, TILE : 2 * TILE]
    np.testing.assert_array_equal(np.frombuffer(raw.content, np.uint8).reshape(chunk.shape), chunk)
    png = np.asarray(Image.open(io.BytesIO(r.content)))
    np.testing.assert_array_equal(png, chunk)  # palette PNG: pixel values are the classes
    webp = call(
        env, "GET", "/api/images/slide/tiles/image/0/0/0", headers={"Accept": "image/webp,*/*"}
    )
    assert webp.headers["Content-Type"] == "image/webp"
    jpeg = call(env, "GET", "/api/images/slide/tiles/image/0/0/0")
    assert jpeg.headers["Content-Type"] == "image/jpeg"
    conf = call(env, "GET", "/api/images/slide/tiles/confidence/1/0/0")
    assert conf.status_code == 200


def test_tile_pack_serves_a_restarted_server_and_never_an_edited_chunk(base_store, tmp_path):
    store = tmp_path / "slide.zarr"
    shutil.copytree(base_store, store)
    env = {"tokens": {"reviewer": add_user(store, "reviewer", "reviewer")}}
    png = {"Accept": "image/png"}
    env["server"] = Server(store, no_tile_pack=True)  # reference: encoded on demand
    paths = [
        f"/api/images/slide/tiles/{layer}/0/1/0"
        for layer in ("image", "segmentation", "confidence")
    ]
    on_demand = [call(env, "GET", p, headers=png).content for p in paths]
    env["server"].stop()
    packed = pack_path(store)
    assert not packed.exists()
    (store / LEGACY_NAME).write_bytes(b"an older segloop's pack")
    env["server"] = Server(store)
    assert not (store / LEGACY_NAME).exists()  # deleted: the pack lives in the cache now
    deadline = time.monotonic() + 60
    while (pack := call(env, "GET", "/api/images/slide").json()["tile_pack"])["tiles"] < pack["of"]:
        assert time.monotonic() < deadline, pack
        time.sleep(0.1)
    env["server"].stop()
    assert packed.parent.parent == Path(os.environ["SEGLOOP_CACHE"])
    assert not any(p.name.startswith("review-tiles") for p in store.iterdir())
    with sqlite3.connect(packed) as db:
        rows = db.execute("SELECT count(*), count(DISTINCT layer || fmt) FROM tiles").fetchone()
    # the slide's zlib tiles are not passed through: image webp + jpeg, labels and
    # confidence png at every position
    assert rows == (4 * pack["of"], 4)
    with sqlite3.connect(packed) as db:  # mark one packed tile
        db.execute(
            "UPDATE tiles SET data = ? WHERE level = 0 AND ty = 1 AND tx = 0 "
            "AND layer = 'confidence' AND fmt = 'png'",
            (b"from the pack",),
        )
    env["server"] = Server(store)  # restarted: answers from the pack, the same bytes
    try:
        assert call(env, "GET", "/api/images/slide").json()["tile_pack"] == pack
        served = [call(env, "GET", p, headers=png).content for p in paths]
        assert served == [*on_demand[:2], b"from the pack"]  # stored bytes, not re-encoded
        stroke = {"op": "brush", "points": [[20, TILE + 20]], "label": 2, "radius": 10}
        assert call(env, "POST", "/api/images/slide/edits", json=stroke).status_code == 200
        edited = call(env, "GET", paths[1], headers=png)
        assert edited.headers["ETag"].endswith('-v1-png"')
        got = np.asarray(Image.open(io.BytesIO(edited.content)))
        np.testing.assert_array_equal(got, labels(store)[TILE : 2 * TILE, :TILE])
        assert got[20, 20] == 2
    finally:
        env["server"].stop()


# --- edits --------------------------------------------------------------------------------


def test_edit_undo_redo_and_pyramid(env):
    store = env["store"]
    before = labels(store)
    x, y = 700, 300
    stroke = {
        "op": "brush",
        "points": [[x, y], [x + 40, y + 10]],
        "label": 2,
        "radius": 12,
        "base": {f"{y // TILE}/{x // TILE}": 0},
    }
    r = call(env, "POST", "/api/images/slide/edits", json=stroke)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["changed_px"] > 0 and out["versions"][f"{y // TILE}/{x // TILE}"] == 1
    # the tile answers the new labels at once, before the shard write behind the ack
    tile = call(
        env,
        "GET",
        f"/api/images/slide/tiles/segmentation/0/{y // TILE}/{x // TILE}?v=1",
        headers={"Accept": "application/octet-stream"},
    )
    assert tile.headers["ETag"].endswith('-v1-raw"')
    after = labels(store)
    ty, tx = (y // TILE) * TILE, (x // TILE) * TILE
    expected = after[ty : ty + TILE, tx : tx + TILE]
    np.testing.assert_array_equal(
        np.frombuffer(tile.content, np.uint8).reshape(expected.shape), expected
    )
    assert after[y, x] == 2 and after[y + 10, x + 40] == 2
    assert np.count_nonzero(after != before) == out["changed_px"]
    np.testing.assert_array_equal(labels(store, 1), downsample_mode(after))
    # drawn on version 0, now 1: conflict
    r = call(env, "POST", "/api/images/slide/edits", json=stroke)
    assert r.status_code == 409 and r.json()["versions"] == {f"{y // TILE}/{x // TILE}": 1}
    assert call(env, "POST", "/api/images/slide/undo").status_code == 200
    np.testing.assert_array_equal(labels(store), before)
    assert call(env, "POST", "/api/images/slide/redo").status_code == 200
    np.testing.assert_array_equal(labels(store), after)
    hist = call(env, "GET", "/api/images/slide/edits?limit=3").json()
    assert [h["op"] for h in hist] == ["redo", "undo", "brush"]
    assert hist[0]["user"] == "reviewer"


def test_other_ops(env):
    store = env["store"]
    poly = {"op": "polygon", "points": [[100, 1000], [180, 1000], [180, 1080]], "label": 1}
    assert call(env, "POST", "/api/images/slide/edits", json=poly).status_code == 200
    assert labels(store)[1001, 178] == 1
    lab = labels(store)
    ys, xs = np.nonzero(lab == 2)
    seed = [int(xs[len(xs) // 2]), int(ys[len(ys) // 2])]
    fill = {"op": "relabel", "points": [seed], "label": 1}
    assert call(env, "POST", "/api/images/slide/edits", json=fill).status_code == 200
    assert labels(store)[seed[1], seed[0]] == 1
    # every pyramid level is still the 2×2 mode of the one below (the server recomputes
    # only the boxes over changed pixels)
    levels = len(list((store / "labels/segmentation").glob("[0-9]*")))
    assert levels >= 3
    for level in range(1, levels):
        np.testing.assert_array_equal(
            labels(store, level), downsample_mode(labels(store, level - 1))
        )


def test_two_editors_one_chunk_rebase(env):
    store = env["store"]
    key = "4/4"
    v = call(env, "GET", "/api/images/slide/tiles/segmentation/0/4/4").headers["ETag"]
    version = int(v.split("-v")[1].split("-")[0])
    a = {"op": "brush", "points": [[1050, 1050]], "label": 2, "radius": 5, "base": {key: version}}
    b = {"op": "brush", "points": [[1200, 1200]], "label": 1, "radius": 5, "base": {key: version}}
    ra = call(env, "POST", "/api/images/slide/edits", "reviewer", json=a)
    rb = call(env, "POST", "/api/images/slide/edits", "reviewer2", json=b)
    assert ra.status_code == 200 and rb.status_code == 409
    b["base"] = rb.json()["versions"]  # rebase: redraw on the current version
    assert call(env, "POST", "/api/images/slide/edits", "reviewer2", json=b).status_code == 200
    lab = labels(store)
    assert lab[1050, 1050] == 2 and lab[1200, 1200] == 1


def test_resent_client_id_is_applied_once(env):
    """A lost ack makes the client send the same edit again: the server answers with the
    edit it already made, and another user cannot reuse the id."""
    body = {"op": "brush", "points": [[300, 700]], "label": 2, "radius": 6, "client_id": "c-1"}
    first = call(env, "POST", "/api/images/slide/edits", "reviewer", json=body).json()
    again = call(env, "POST", "/api/images/slide/edits", "reviewer", json=body).json()
    assert again["edit_id"] == first["edit_id"] and again["duplicate"] is True
    assert again["versions"] == first["versions"]
    history = call(env, "GET", "/api/images/slide/edits?limit=1000").json()
    assert sum(1 for e in history if e["id"] == first["edit_id"]) == 1
    r = call(env, "POST", "/api/images/slide/edits", "reviewer2", json=body)
    assert r.status_code == 400 and "client_id" in r.json()["error"]
    body["client_id"] = "x" * 65
    r = call(env, "POST", "/api/images/slide/edits", "reviewer", json=body)
    assert r.status_code == 400


def test_annotator_proposals_and_rejection(env):
    store = env["store"]
    before = labels(store)[100, 1250]
    new = 2 if before != 2 else 1
    edit = {"op": "brush", "points": [[1250, 100]], "label": new, "radius": 4}
    r = call(env, "POST", "/api/images/slide/edits", "annotator", json=edit)
    assert r.status_code == 200 and r.json()["status"] == "proposed"
    assert labels(store)[100, 1250] == new
    r = call(
        env,
        "POST",
        f"/api/images/slide/edits/{r.json()['edit_id']}/decision",
        json={"decision": "reject"},
    )
    assert r.status_code == 200 and r.json()["status"] == "rejected"
    assert labels(store)[100, 1250] == before


# --- review, queue, live ------------------------------------------------------------------


def test_review_state_and_coverage(env):
    r = call(
        env,
        "PUT",
        "/api/images/slide/review/2/3",
        "annotator",
        json={"state": "flagged", "reason": "out_of_distribution", "comment": "odd stain"},
    )
    assert r.status_code == 200
    got = call(env, "GET", "/api/images/slide/review/2/3", "viewer").json()
    assert got["state"] == "flagged" and got["reason"] == "out_of_distribution"
    cov = call(env, "GET", "/api/images/slide/coverage", "viewer").json()
    assert cov["grid"][2][3] == cov["states"].index("flagged")
    bad = call(
        env, "PUT", "/api/images/slide/review/2/3", json={"state": "flagged", "reason": "tired"}
    )
    assert bad.status_code == 400


def test_queue_leases_least_certain_first(env):
    a = call(env, "POST", "/api/images/slide/queue/next", "reviewer").json()
    b = call(env, "POST", "/api/images/slide/queue/next", "reviewer2").json()
    assert a["tile"] != b["tile"]
    assert a["uncertainty"] >= b["uncertainty"]
    # a short lease expires and the tile goes back to the queue
    assert call(
        env, "POST", "/api/images/slide/queue/release", "reviewer", json={"tile": a["tile"]}
    ).json()["released"]
    short = call(env, "POST", "/api/images/slide/queue/next?minutes=0.001", "reviewer").json()
    assert short["tile"] == a["tile"]
    time.sleep(0.2)
    again = call(env, "POST", "/api/images/slide/queue/next", "admin").json()
    assert again["tile"] == a["tile"]


def test_live_updates_over_websocket(env):
    async def go():
        url = env["server"].base + f"/api/images/slide/live?token={env['tokens']['viewer']}"
        async with aiohttp.ClientSession() as s, s.ws_connect(url) as ws:
            edit = {"op": "brush", "points": [[30, 1400]], "label": 1, "radius": 3}
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: call(env, "POST", "/api/images/slide/edits", json=edit)
            )
            msg = await asyncio.wait_for(ws.receive_json(), 20)
            return msg

    msg = asyncio.run(go())
    assert msg["type"] == "chunks" and f"0/{1400 // TILE}/0" in msg["versions"]


def test_openapi_and_metrics(env):
    spec = call(env, "GET", "/api/openapi.json", "viewer").json()
    assert "/api/images/{image}/edits" in spec["paths"]
    assert "Edit" in spec["components"]["schemas"]
    text = call(env, "GET", "/metrics", "viewer").text
    assert "segloop_request_seconds_bucket" in text and "segloop_tiles_served_total" in text


def test_users_cli(env, tmp_path):
    store = env["store"]
    token = add_user(store, "temp", "viewer")
    assert (
        call(
            env, "GET", "/api/images", who=None, headers={"Authorization": f"Bearer {token}"}
        ).status_code
        == 200
    )
    listed = run_cli("users", "list", "--store", store).stdout
    assert "temp\tviewer\tactive" in listed and token not in listed
    assert run_cli("users", "revoke", "temp", "--store", store).returncode == 0
    assert (
        call(
            env, "GET", "/api/images", who=None, headers={"Authorization": f"Bearer {token}"}
        ).status_code
        == 401
    )
    assert_user_error(
        run_cli("users", "add", "viewer", "--role", "viewer", "--store", store), "exists"
    )
    assert_user_error(run_cli("serve", tmp_path), "not a segloop store")


# --- reliability --------------------------------------------------------------------------


def test_sigkill_during_edit_storm_loses_no_acknowledged_edit(base_store, tmp_path):
    store = tmp_path / "slide.zarr"
    shutil.copytree(base_store, store)
    token = add_user(store, "ed", "reviewer")
    server = Server(store)
    acked: list[tuple[int, int, int, int]] = []  # (edit_id, x, y, label)
    stop = threading.Event()

    def client(k: int) -> None:
        rng = np.random.default_rng(k)
        s = requests.Session()
        s.headers["Authorization"] = f"Bearer {token}"
        while not stop.is_set():
            x, y = int(rng.integers(5, 1295)), int(rng.integers(5, 1495))
            label = int(rng.integers(0, 3))
            try:
                r = s.post(
                    server.base + "/api/images/slide/edits",
                    timeout=10,
                    json={"op": "brush", "points": [[x, y]], "label": label, "radius": 2},
                )
            except requests.RequestException:
                return
            if r.status_code == 200 and r.json()["edit_id"]:
                acked.append((r.json()["edit_id"], x, y, label))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acked) < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.stop(signal.SIGKILL)
    stop.set()
    for t in threads:
        t.join()
    assert len(acked) >= 10, "the storm should have been acknowledged a while"
    restarted = Server(store)  # replays committed edits not yet in zarr
    try:
        hist = requests.get(
            restarted.base + "/api/images/slide/edits?limit=1000",
            timeout=30,
            headers={"Authorization": f"Bearer {token}"},
        ).json()
    finally:
        restarted.stop()
    ids = {h["id"] for h in hist}
    assert {a[0] for a in acked} <= ids, "an acknowledged edit is missing from history"
    # zarr must equal the base store with every committed edit applied in order:
    # nothing lost, nothing half-applied
    with sqlite3.connect(store / "segloop" / "review.sqlite") as db:
        rows = db.execute("SELECT delta, applied FROM edits ORDER BY id").fetchall()
    assert all(applied for _, applied in rows), "replay left an edit unapplied"
    expect = with_deltas(labels(base_store), [blob for blob, _ in rows])
    lab = labels(store)
    np.testing.assert_array_equal(lab, expect)
    np.testing.assert_array_equal(labels(store, 1), downsample_mode(lab))

"""A bounded soak of the review server (issue 16): 8 clients edit, paint, undo, redo, lease
and read tiles for ``SEGLOOP_SOAK_S`` seconds (default 20) while a ninth sends the largest
polygons and strokes the per-edit budget allows; then the server is SIGKILLed mid-storm and
restarted.

Asserted: zero 5xx, the server's peak RSS under 1.5 GB, and every acknowledged edit in the
history and in zarr (the store equals the original with every committed delta applied in
order). ``/api/health`` latency during the soak is recorded (printed, and as the test's
``health_p50_ms`` / ``health_p99_ms`` properties), never asserted: no timed assertions.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import requests

from segloop.pipeline.pyramid import downsample_mode
from segloop.review.worst import worst_polygon, worst_stroke
from tests.conftest import TILE
from tests.test_review import Server, add_user, labels, with_deltas

SOAK_S = float(os.environ.get("SEGLOOP_SOAK_S", "20"))
H, W = 1500, 1300  # the test slide
API = "/api/images/slide"
RSS_LIMIT_MB = 1536


class Tally:
    """Status codes and acknowledged edit ids, from every thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.codes: Counter[tuple[str, int]] = Counter()
        self.errors: list[str] = []
        self.acked: set[int] = set()

    def note(self, what: str, r: requests.Response) -> None:
        with self.lock:
            self.codes[what, r.status_code] += 1
            if r.status_code >= 500:
                self.errors.append(f"{what}: {r.status_code} {r.text[:200]}")
            elif r.status_code == 200 and what in ("edit", "undo", "redo", "worst"):
                edit_id = r.json().get("edit_id")
                if edit_id:
                    self.acked.add(int(edit_id))


def _client(base: str, token: str, seed: int, stop: threading.Event, tally: Tally) -> None:
    """One annotator or reviewer at work: strokes, erases, polygons, undo/redo, a lease now
    and then, and the tiles it looks at."""
    rng = np.random.default_rng(seed)
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {token}"
    while not stop.is_set():
        x, y = int(rng.integers(20, W - 20)), int(rng.integers(20, H - 20))
        pick = rng.random()
        try:
            if pick < 0.35:
                walk = np.cumsum(rng.integers(-15, 16, (int(rng.integers(2, 30)), 2)), axis=0)
                pts = np.clip(walk + np.array([x, y]), 0, [W - 1, H - 1]).tolist()
                op = "erase" if pick < 0.05 else "brush"
                body = {"op": op, "points": pts, "label": int(rng.integers(1, 3)), "radius": 6}
                tally.note("edit", s.post(base + f"{API}/edits", json=body, timeout=120))
            elif pick < 0.5:
                tri = np.clip([[x, y], [x + 60, y + 10], [x + 20, y + 70]], 0, [W - 1, H - 1])
                body = {"op": "polygon", "points": tri.tolist(), "label": int(rng.integers(3))}
                tally.note("edit", s.post(base + f"{API}/edits", json=body, timeout=120))
            elif pick < 0.65:
                tally.note("undo", s.post(base + f"{API}/undo", timeout=120))
            elif pick < 0.72:
                tally.note("redo", s.post(base + f"{API}/redo", timeout=120))
            elif pick < 0.8:
                r = s.post(base + f"{API}/queue/next?minutes=1", timeout=120)
                tally.note("lease", r)
                if r.status_code == 200 and r.json().get("tile"):
                    body = {"tile": r.json()["tile"]}
                    tally.note(
                        "lease", s.post(base + f"{API}/queue/release", json=body, timeout=120)
                    )
            else:
                ty, tx = y // TILE, x // TILE
                r = s.get(base + f"{API}/tiles/segmentation/0/{ty}/{tx}", timeout=120)
                tally.note("tile", r)
        except requests.RequestException:
            return  # the server was killed


def _worst(base: str, token: str, stop: threading.Event, tally: Tally) -> None:
    """The largest allowed polygon and stroke, in turn, back to back."""
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {token}"
    bodies = [worst_polygon((H, W), TILE), worst_stroke((H, W), TILE)]
    k = 0
    while not stop.is_set():
        body = bodies[k % 2]
        body["label"] = 1 + (k // 2) % 2  # alternate labels: each one changes pixels
        try:
            tally.note("worst", s.post(base + f"{API}/edits", json=body, timeout=300))
        except requests.RequestException:
            return
        k += 1


def _ping(base: str, stop: threading.Event, tally: Tally, lat: list[float]) -> None:
    s = requests.Session()
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            r = s.get(base + "/api/health", timeout=120)
        except requests.RequestException:
            return
        lat.append(time.perf_counter() - t0)
        tally.note("health", r)


def _peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(ln for ln in status.splitlines() if ln.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _history_ids(base: str, token: str) -> set[int]:
    """Every edit id in the audit trail, page by page."""
    ids: set[int] = set()
    before = 2**62
    while True:
        r = requests.get(
            base + f"{API}/edits?limit=1000&before={before}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        page = r.json()
        if not page:
            return ids
        ids |= {row["id"] for row in page}
        before = min(row["id"] for row in page)


def test_soak_then_sigkill_loses_nothing(base_store, tmp_path, record_property):
    store = tmp_path / "slide.zarr"
    shutil.copytree(base_store, store)
    roles = ["reviewer"] * 6 + ["annotator"] * 2
    tokens = [add_user(store, f"c{k}", role) for k, role in enumerate(roles)]
    heavy = add_user(store, "heavy", "reviewer")
    server = Server(store)
    stop, tally, lat = threading.Event(), Tally(), []
    threads = [
        threading.Thread(target=_client, args=(server.base, t, k, stop, tally))
        for k, t in enumerate(tokens)
    ]
    threads.append(threading.Thread(target=_worst, args=(server.base, heavy, stop, tally)))
    threads.append(threading.Thread(target=_ping, args=(server.base, stop, tally, lat)))
    for t in threads:
        t.start()
    try:
        stop.wait(SOAK_S)  # the soak's length: a bound, not a timing assertion
        worst_done = sum(n for (what, code), n in tally.codes.items() if what == "worst")
        deadline = time.monotonic() + 600
        while worst_done < 2 and time.monotonic() < deadline:  # ≥ 1 polygon and 1 stroke
            time.sleep(0.05)
            worst_done = sum(n for (what, code), n in tally.codes.items() if what == "worst")
        peak_mb = _peak_rss_mb(server.proc.pid)
        server.stop(signal.SIGKILL)  # mid-storm: clients are still sending
    finally:
        stop.set()
        for t in threads:
            t.join()
        if server.proc.poll() is None:
            server.stop(signal.SIGKILL)

    ms = np.asarray(lat) * 1000
    p50, p99 = float(np.percentile(ms, 50)), float(np.percentile(ms, 99))
    record_property("health_p50_ms", round(p50, 1))
    record_property("health_p99_ms", round(p99, 1))
    record_property("server_peak_rss_mb", round(peak_mb))
    print(
        f"\nsoak {SOAK_S:g} s: {sum(tally.codes.values())} requests {dict(tally.codes)}; "
        f"health p50 {p50:.1f} ms p99 {p99:.1f} ms (n={len(ms)}); peak RSS {peak_mb:.0f} MB"
    )
    assert not tally.errors, tally.errors[:5]
    worst = {code for what, code in tally.codes if what == "worst"}
    assert worst == {200} and tally.codes["worst", 200] >= 2, tally.codes  # all accepted
    assert sum(n for (what, code), n in tally.codes.items() if code == 200) > 50, tally.codes
    assert peak_mb < RSS_LIMIT_MB, f"server peak RSS {peak_mb:.0f} MB"

    restarted = Server(store)  # replays committed edits not yet in zarr
    try:
        ids = _history_ids(restarted.base, heavy)
    finally:
        restarted.stop()
    missing = tally.acked - ids
    assert not missing, f"{len(missing)} acknowledged edits missing from the history"
    # zarr = the original with every committed delta applied in order (undo, redo and
    # the worst edits included): nothing acknowledged lost, nothing half-applied
    with sqlite3.connect(store / "segloop" / "review.sqlite") as db:
        rows = db.execute("SELECT id, delta, applied FROM edits ORDER BY id").fetchall()
    assert tally.acked <= {r[0] for r in rows}
    assert all(applied for _, _, applied in rows), "replay left an edit unapplied"
    expect = with_deltas(labels(base_store), [blob for _, blob, _ in rows])
    lab = labels(store)
    np.testing.assert_array_equal(lab, expect)
    np.testing.assert_array_equal(labels(store, 1), downsample_mode(lab))

"""Continuous learning experiment: do corrections improve the rest of the slide while the
expert keeps reviewing, automatically and safely (``segloop serve --learn``)?

1. ``segloop synth --stain mixed`` (H&E with patches of a shifted stain: out of
   distribution, OOD) + ground truth; ``segloop segment`` with model v1.
2. ``segloop serve --learn --every 1`` on a copy of the model repository. A simulated
   expert (``hitl_experiment.review_tile``) works through the HTTP API as the browser
   does: leases the next queue tile, traces each wrong region of the truth as a
   polygon, marks it corrected, and goes on while the server learns. After 1, 2, 5, 10
   and 20 tiles it waits until the server has learned from every verdict so far and
   re-predicted the unreviewed tiles, then the served labels are read (raw tiles).
3. Nucleus IoU, in distribution (ID) and OOD, on the tiles no human touched during the
   whole run (the same pixels at every point of the curve); seconds from a verdict to
   the first re-predicted tiles served (the server's own measure) and to all of them.
4. Tile and edit latencies, side by side: cold tiles and edit round trips (the probe of
   ``segloop bench serve``) before any learning and while a round trains.
5. A noisy annotator (30 % of its polygons painted with a wrong class) reviews tiles;
   a reviewer audits a few of them. The trust rule (``segloop.learn.trust``) keeps the
   annotator's unaudited proposals out of training: shown by the rounds' training sets.

``python benchmarks/hitl_continuous.py [--size 3072] [--k 20] [--out benchmarks/results]``
writes ``hitl_continuous.json`` (``learning_curve``, ``seconds_verdict_to_update_p50``),
``.md`` and ``.png``. CPU only; about 25 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hitl_experiment import cli, ood_pixels, review_tile, scores

from segloop.bench.process import ServerProcess
from segloop.bench.serve import edit_round_trips, fetch_all, percentiles
from segloop.review.db import ReviewDB

ROOT = Path(__file__).resolve().parents[1]
SEGLOOP = [sys.executable, "-m", "segloop"]
CHECKPOINTS = (1, 2, 5, 10, 20)
PROBE = 2  # the latency probe's edits go into the bottom-right PROBE × PROBE tiles


class Client:
    """One user's HTTP session on the served image."""

    def __init__(self, base: str, token: str) -> None:
        self.base, self.token = base, token
        self.s = requests.Session()
        self.s.headers["Authorization"] = f"Bearer {token}"
        self.api = f"{base}/api/images/slide"
        self.meta = self.s.get(self.api).json()
        self.tile = self.meta["tile"]
        h, w = self.meta["shape"]
        self.grid = (-(-h // self.tile), -(-w // self.tile))

    def model(self) -> dict:
        return self.s.get(f"{self.api}/model").json()

    def wait(self, what, timeout: float = 1800) -> dict:
        deadline = time.monotonic() + timeout
        while not what(m := self.model()):
            if time.monotonic() > deadline:
                raise SystemExit(f"the learner did not get there: {json.dumps(m)[:2000]}")
            time.sleep(0.5)
        return m

    def learned_all(self) -> dict:
        """Wait until every verdict so far was learned from and its tiles re-predicted."""
        return self.wait(lambda m: m["round"] is None and m["pending_verdicts"] == 0)

    def labels(self) -> np.ndarray:
        """The served labels, tile by tile (raw bytes, as a client sees them)."""
        h, w = self.meta["shape"]
        out = np.zeros((h, w), np.uint8)
        t = self.tile
        for ty in range(self.grid[0]):
            for tx in range(self.grid[1]):
                raw = self.s.get(
                    f"{self.api}/tiles/segmentation/0/{ty}/{tx}",
                    headers={"Accept": "application/octet-stream"},
                ).content
                y1, x1 = min(h, (ty + 1) * t), min(w, (tx + 1) * t)
                out[ty * t : y1, tx * t : x1] = np.frombuffer(raw, np.uint8).reshape(
                    y1 - ty * t, x1 - tx * t
                )
        return out


def serve(store: Path, repo: Path, env: dict, args) -> ServerProcess:
    cmd = [*SEGLOOP, "serve", str(store), "--port", "{port}", "--learn", "--every", "1",
           "--learn-steps", str(args.learn_steps), "--model-repository", str(repo)]  # fmt: skip
    if args.learn_threads:
        cmd += ["--learn-threads", str(args.learn_threads)]
    return ServerProcess(cmd, env=env, timeout_s=120)


def fresh(base: Path, v1: Path, work: Path, name: str) -> tuple[Path, Path]:
    """A copy of the v1 store and of the model repository (v1 only) for one run."""
    store, repo = work / name / "slide.zarr", work / name / "model_repository"
    shutil.rmtree(work / name, ignore_errors=True)
    shutil.copytree(v1, store)
    shutil.copytree(
        base / "model_repository", repo, ignore=shutil.ignore_patterns("__pycache__", "[2-9]*")
    )
    return store, repo


def add(store: Path, name: str, role: str, env: dict) -> str:
    out = cli("users", "add", name, "--role", role, "--store", str(store), "--quiet", env=env)
    return out.strip().splitlines()[-1]


def probe(c: Client, prober: str, urls: list[str], edits: int) -> dict:
    """Cold tile latencies (``urls``, 8 clients) and ``edits`` edit round trips in the
    probe corner, by ``prober`` (an annotator's token: its random strokes are proposals
    nobody approves, which the trust rule keeps out of training)."""
    headers = {"Authorization": f"Bearer {c.token}", "Accept": "image/webp,*/*"}
    lat, _, wall = asyncio.run(fetch_all(c.base, headers, urls, 8, None))
    h, w = c.meta["shape"]
    t = c.tile
    # a stroke spans 300 × ±150 px from its start, radius 40: starts that keep it inside
    box = (h - PROBE * t + 190, h - 190, w - PROBE * t + 40, w - 340)
    asyncio.run(edit_round_trips(c.base, prober, (h, w), 3, "slide", box))  # warm-up
    edit = asyncio.run(edit_round_trips(c.base, prober, (h, w), edits, "slide", box))
    return {"cold_tiles": {**percentiles(lat), "tiles_s": round(len(lat) / wall, 1)},
            "edit_round_trip": percentiles(edit)}  # fmt: skip


def expert_run(args, base, v1, work, env, truth, ood) -> dict:
    store, repo = fresh(base, v1, work, "expert")
    token = add(store, "expert", "reviewer", env)
    prober = add(store, "prober", "annotator", env)
    curve, reviewed, all_updated = [], [], []
    with serve(store, repo, env, args) as server:
        c = Client(server.base, token)
        c.wait(lambda m: m["learning"])
        while True:  # the tile pack is built in the background at start: let it finish
            pack = c.s.get(c.api).json().get("tile_pack") or {}
            if pack.get("tiles") == pack.get("of"):
                break
            time.sleep(0.2)
        ny, nx = c.grid
        urls = [
            f"/api/images/slide/tiles/{layer}/0/{ty}/{tx}"
            for layer in ("image", "segmentation", "confidence")
            for ty in range(ny)
            for tx in range(nx)
        ]
        random.Random(1).shuffle(urls)
        half = len(urls) // 2
        latency = {"idle": probe(c, prober, urls[:half], args.edits)}
        snapshots = {0: (c.labels(), 1)}
        t_start = time.time()
        for i in range(1, args.k + 1):
            lease = c.s.post(f"{c.api}/queue/next").json()
            if lease["tile"] is None:
                break
            ty, tx = lease["tile"]
            edits, px = review_tile(c.s, c.api, c.tile, ty, tx, truth)
            t_verdict = time.time()
            reviewed.append({"tile": [ty, tx], "edits": edits, "px": px, "at": t_verdict})
            print(f"  tile {i}: {ty},{tx} {edits} edits", flush=True)
            if i == 1:  # the probe again while the first round trains (tiles still as
                # segmented, in the tile pack, as in the idle probe)
                c.wait(lambda m: (m["round"] or {}).get("state") == "training")
                latency["learning"] = probe(c, prober, urls[half:], args.edits)
                latency["learning"]["round_state_after"] = (c.model()["round"] or {}).get("state")
            if i in CHECKPOINTS:
                m = c.learned_all()
                all_updated.append(round(time.time() - t_verdict, 1))
                snapshots[i] = (c.labels(), m["served"]["version"])
                print(f"  after {i} tiles: serving v{m['served']['version']}", flush=True)
        model = c.model()
        wall = time.time() - t_start
    t = c.tile
    human = np.zeros((ny * t, nx * t), bool)
    touched = ReviewDB.human_tiles(store)  # reviewed, and the probe's edits
    for ty, tx in touched:
        human[ty * t : (ty + 1) * t, tx * t : (tx + 1) * t] = True
    keep = ~human[: truth.shape[0], : truth.shape[1]]
    for n, (labels, version) in sorted(snapshots.items()):
        sc = scores(labels, truth, ood, keep)
        curve.append({
            "tiles": n, "iou_ood": sc["ood"]["nucleus"], "iou_id": sc["id"]["nucleus"],
            "mean_ood": sc["ood"]["mean"], "mean_id": sc["id"]["mean"], "served": version,
        })  # fmt: skip
    lat = model["seconds_verdict_to_update"]
    return {
        "learning_curve": curve,
        "seconds_verdict_to_update": lat,
        "seconds_verdict_to_update_p50": float(np.median(lat)) if lat else None,
        "seconds_checkpoint_verdict_to_all_updated": all_updated,
        "versions": model["versions"],
        "reviewed": reviewed,
        "latency": latency,
        "wall_s": round(wall, 1),
        "evaluated_px": int(keep.sum()),
        "human_tiles": len(touched),
    }


def noisy_run(args, base, v1, work, env, truth, ood) -> dict:
    """A careless annotator reviews ``noisy_k`` tiles; a reviewer audits ``audit`` of them."""
    store, repo = fresh(base, v1, work, "noisy")
    tokens = {
        "noisy": add(store, "noisy", "annotator", env),
        "auditor": add(store, "auditor", "reviewer", env),
    }
    rng = np.random.default_rng(args.seed)
    with serve(store, repo, env, args) as server:
        noisy = Client(server.base, tokens["noisy"])
        auditor = Client(server.base, tokens["auditor"])
        before = noisy.labels()
        done = []
        for _ in range(args.noisy_k):
            lease = noisy.s.post(f"{noisy.api}/queue/next").json()
            ty, tx = lease["tile"]
            review_tile(noisy.s, noisy.api, noisy.tile, ty, tx, truth, wrong=0.3, rng=rng)
            done.append((ty, tx))
        history = auditor.s.get(f"{auditor.api}/edits", params={"limit": 1000}).json()
        for ty, tx in done[: args.audit]:  # the reviewer rejects the proposals, repaints
            for e in history:
                if (
                    e["user"] == "noisy"
                    and e["status"] == "proposed"
                    and f"{ty}/{tx}" in e["chunks"]
                ):
                    r = auditor.s.post(
                        f"{auditor.api}/edits/{e['id']}/decision", json={"decision": "reject"}
                    )
                    if r.status_code not in (200, 409):  # 409: decided with another one
                        raise SystemExit(f"decision refused: {r.status_code} {r.text}")
            review_tile(auditor.s, auditor.api, auditor.tile, ty, tx, truth)
        m = auditor.learned_all()
        after = auditor.labels()
        stats = auditor.s.get(f"{auditor.api}/stats").json()
    rounds = sorted((store / "segloop" / "learn" / "rounds").glob("v*/training_set.json"))
    sets = [json.loads(p.read_text()) for p in rounds]
    trained = sorted({tuple(t[:2]) for s in sets for t in s["tiles"]})
    t = noisy.tile
    touched = np.zeros_like(truth, bool)
    for ty, tx in done:
        touched[ty * t : (ty + 1) * t, tx * t : (tx + 1) * t] = True
    keep = ~touched
    unaudited = [list(x) for x in done[args.audit :]]
    return {
        "annotator_tiles": [list(x) for x in done],
        "audited": [list(x) for x in done[: args.audit]],
        "trained_on": [list(x) for x in trained],
        "unaudited_trained": [x for x in unaudited if tuple(x) in trained],
        "excluded": sets[-1]["excluded"] if sets else [],
        "annotator_trust": sets[-1]["annotators"] if sets else {},
        "agreement": stats["agreement"]["mean_iou"],
        "versions": m["versions"],
        "before": scores(before, truth, ood, keep),
        "after": scores(after, truth, ood, keep),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e = result["expert"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    n = [p["tiles"] for p in e["learning_curve"]]
    ax[0].plot(n, [p["iou_ood"] for p in e["learning_curve"]], marker="o", label="OOD nucleus")
    ax[0].plot(n, [p["iou_id"] for p in e["learning_curve"]], marker="s", label="ID nucleus")
    ax[0].set_xlabel("tiles corrected (server learning live)")
    ax[0].set_ylabel("IoU on tiles no human touched")
    ax[0].set_ylim(0, 1.02)
    ax[0].legend(loc="lower right")
    ax[0].set_title("learning curve")
    lat = e["seconds_verdict_to_update"]
    ax[1].hist(lat, bins=20)
    ax[1].axvline(120, color="k", ls="--", label="target 120 s")
    ax[1].set_xlabel("s from a verdict to re-predicted tiles served")
    ax[1].legend()
    ax[1].set_title(f"p50 {e['seconds_verdict_to_update_p50']} s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(r: dict) -> str:
    e, noisy = r["expert"], r.get("noisy")
    c0 = e["learning_curve"][0]
    at5 = next((p for p in e["learning_curve"] if p["tiles"] == 5), None)
    lines = [
        f"# Continuous learning ({r['machine']})",
        "",
        f"{r['image']['size']}² mixed-stain slide, tile {r['image']['tile']}, "
        f"`serve --learn --every 1 --learn-steps {r['learn_steps']}`; the expert corrects "
        "queue tiles through the HTTP API while the server learns. IoU on the "
        f"{e['evaluated_px'] / 1e6:.1f} Mpx of tiles no human touched.",
        "",
        "| tiles corrected | served | nucleus IoU OOD | nucleus IoU ID |",
        "|---|---|---|---|",
        *[
            f"| {p['tiles']} | v{p['served']} | {p['iou_ood']:.3f} | {p['iou_id']:.3f} |"
            for p in e["learning_curve"]
        ],
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for name, value, ok in r["targets"]:
        lines.append(f"| {name} | {value} | {'yes' if ok else 'NO'} |")
    lines += [
        "",
        "Latency while idle vs while the first round trains (same server, halves of one "
        "shuffled set of level-0 tiles, each fetched once, from the tile pack; 8 clients; "
        "edits in the probe corner, an annotator's):",
        "",
        "| | cold tile p50 / p99 ms | edit p50 / p99 ms |",
        "|---|---|---|",
    ]
    for k, v in e["latency"].items():
        ct, ed = v["cold_tiles"], v["edit_round_trip"]
        lines.append(f"| {k} | {ct['p50_ms']} / {ct['p99_ms']} | {ed['p50_ms']} / {ed['p99_ms']} |")
    lines += ["", f"OOD nucleus IoU before learning {c0['iou_ood']:.3f}"
              + (f", after 5 tiles {at5['iou_ood']:.3f}." if at5 else ".")]  # fmt: skip
    if noisy:
        lines += [
            "",
            f"Noisy annotator: {len(noisy['annotator_tiles'])} tiles with 30 % of polygons "
            f"painted wrong, {len(noisy['audited'])} audited by a reviewer; measured "
            f"agreement {noisy['agreement']}; trained on {len(noisy['trained_on'])} tiles "
            f"(unaudited proposals trained on: {len(noisy['unaudited_trained'])}); "
            f"ID nucleus IoU {noisy['before']['id']['nucleus']:.3f} → "
            f"{noisy['after']['id']['nucleus']:.3f}.",
        ]
    lines += ["", "Seconds: " + ", ".join(f"{k} {v}" for k, v in r["seconds"].items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=3072)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--learn-steps", type=int, default=120)
    ap.add_argument("--learn-threads", type=int, help="default: serve's (every core)")
    ap.add_argument("--edits", type=int, default=20, help="edits per latency probe")
    ap.add_argument("--noisy-k", type=int, default=8)
    ap.add_argument("--audit", type=int, default=3)
    ap.add_argument("--no-noisy", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--workdir", type=Path, help="keep intermediate files here")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="segloop-hitlc-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SEGLOOP_CACHE": str(work / "cache")}
    t0 = time.time()
    slide, truth_tif, v1 = work / "slide.ome.tif", work / "truth.tif", work / "slide.zarr"
    n = str(args.size)
    cli("synth", str(slide), "--size", n, "--stain", "mixed", "--seed", str(args.seed),
        "--truth", str(truth_tif), "--overwrite", "--quiet", env=env)  # fmt: skip
    cli("segment", str(slide), "-o", str(v1), "--tile", str(args.tile), "--shard", "1024",
        "--overwrite", "--quiet", env=env)  # fmt: skip
    truth = tifffile.imread(truth_tif)
    ood = ood_pixels(*truth.shape, seed=args.seed)
    seconds = {"synth_and_segment_v1": round(time.time() - t0, 1)}
    t0 = time.time()
    expert = expert_run(args, ROOT, v1, work, env, truth, ood)
    seconds["expert_run"] = round(time.time() - t0, 1)
    noisy = None
    if not args.no_noisy:
        t0 = time.time()
        noisy = noisy_run(args, ROOT, v1, work, env, truth, ood)
        seconds["noisy_run"] = round(time.time() - t0, 1)
    curve = expert["learning_curve"]
    base = curve[0]
    at5 = next((p for p in curve if p["tiles"] == 5), None)
    gain5 = round(at5["iou_ood"] - base["iou_ood"], 3) if at5 else None
    drop = round(max(base["iou_id"] - p["iou_id"] for p in curve), 4)
    p50 = expert["seconds_verdict_to_update_p50"]
    idle, busy = expert["latency"]["idle"], expert["latency"].get("learning")
    targets = [
        ("OOD IoU gain after 5 tiles ≥ 0.5", gain5, gain5 is not None and gain5 >= 0.5),
        ("largest ID drop on the curve ≤ 0.01", drop, drop <= 0.01),
        ("verdict → updated predictions p50 ≤ 120 s", p50, p50 is not None and p50 <= 120),
    ]
    if busy:
        ratio = round(busy["cold_tiles"]["p50_ms"] / idle["cold_tiles"]["p50_ms"], 2)
        targets.append(("cold tile p50 learning ÷ idle (unchanged ≈ 1)", ratio, ratio <= 1.25))
        ratio = round(busy["edit_round_trip"]["p50_ms"] / idle["edit_round_trip"]["p50_ms"], 2)
        targets.append(("edit p50 learning ÷ idle (unchanged ≈ 1)", ratio, ratio <= 1.25))
    if noisy:
        kept_out = not noisy["unaudited_trained"]
        targets.append(("noisy annotator's unaudited proposals trained on", 0 if kept_out
                        else len(noisy["unaudited_trained"]), kept_out))  # fmt: skip
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
        "date": time.strftime("%Y-%m-%d"),
        "image": {"size": args.size, "tile": args.tile, "seed": args.seed, "stain": "mixed"},
        "learn_steps": args.learn_steps,
        "learn_threads": args.learn_threads or os.cpu_count(),
        "learning_curve": [{k: p[k] for k in ("tiles", "iou_ood", "iou_id")} for p in curve],
        "seconds_verdict_to_update_p50": p50,
        "expert": expert,
        "noisy": noisy,
        "targets": targets,
        "seconds": seconds,
        "iou_definition": "nucleus IoU on the pixels of tiles no human touched during the run; "
        "OOD = pixels whose render differs between stain 'mixed' and 'he'",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hitl_continuous.json").write_text(json.dumps(result, indent=2))
    (args.out / "hitl_continuous.md").write_text(markdown(result))
    plot(result, args.out / "hitl_continuous.png")
    print(markdown(result))


if __name__ == "__main__":
    main()

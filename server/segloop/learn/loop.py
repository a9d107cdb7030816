"""``segloop serve --learn``: the review server's side of continuous learning.

After every ``every`` verdicts (a reviewer accepts a tile or marks it corrected, or
approves a proposal) a round starts, one at a time: the trusted tiles (``trust.py``) are
exported, a learner process (``worker.py``) fine-tunes the served version on them,
gates the result against its parent, and predicts the tiles no human touched: those
nearest to where reviewers are working first (the tiles they hold and their last
verdicts), then the least certain. The server applies each batch through the image's
writer thread (``ReviewImage.replace_tiles``): human tiles and leased tiles are never
rewritten, chunk versions are bumped (browsers refetch only what changed, told by the
live WebSocket) and the queue re-ranks on the new uncertainty. What each tile showed
before is kept (``archive.py``), so ``rollback`` to any version once served puts its
predictions back (and predicts with it what it never predicted).

Model versions and updates are recorded in the review database (``models``,
``model_updates``); the repository's newest numeric version is always the served one:
rejected versions live in ``<model>/rejected/``, rolled-back ones in ``<model>/retired/``.
A learner that dies (killed, out of memory) leaves the served version as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segloop.errors import UserError
from segloop.learn.archive import Archive, learn_dir
from segloop.learn.job import Job, encode
from segloop.learn.trust import training_set
from segloop.model.registry import versions
from segloop.review.export import export_corrections
from segloop.review.image import SEG, Prediction, ReviewImage
from segloop.scores import mean_iou

#: every n-th exported tile (n ≥ this) is held out of training to validate on
HOLD_OUT_EVERY = 5
#: verdicts remembered as "where reviewers are working" (the re-prediction order) …
FOCUS_VERDICTS = 8
#: … and seconds a user's view centre counts (``POST …/model/focus``)
LOOK_S = 600.0


@dataclass
class LearnConfig:
    """``serve --learn`` settings; ``job`` holds the learner's (``Job``) own fields."""

    repository: Path
    every: int = 5
    job: dict[str, Any] = field(default_factory=dict)


def check_repository(repository: Path, name: str) -> None:
    """``UserError`` unless ``repository/name`` holds a version and can be written."""
    models = repository / name
    if not versions(models):
        raise UserError(
            f"--learn: no model {name} under {repository}; pass --model-repository DIR "
            "(the repository the store's model came from)"
        )
    if not os.access(models, os.W_OK):
        raise UserError(
            f"--learn writes new versions into {models}, which is not writable; copy the "
            "repository somewhere writable and pass --model-repository DIR"
        )


class Learner:
    """Continuous learning for one image of a running review server."""

    def __init__(self, img: ReviewImage, config: LearnConfig, log=print) -> None:
        self.img, self.config, self.log = img, config, log
        self.name = img.model["name"]
        self.repo = config.repository
        check_repository(self.repo, self.name)
        self.shape, self.tile = img.level_shape(0), img.tile
        self.pending: list[float] = []  # times of the verdicts no round has learned from
        self.unserved: list[float] = []  # … and of those a round learned from, not served
        self.focus: deque[tuple[int, int]] = deque(maxlen=FOCUS_VERDICTS)
        self.looking: dict[int, tuple[tuple[int, int], float]] = {}  # user → (tile, when)
        self.round: dict[str, Any] | None = None
        self.latency_s: list[float] = []  # verdict → first re-predicted tiles served
        self.proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task | None = None
        self._archives: dict[int, Archive] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        if not img.db.models():  # the store's own model: version 1 of the lineage
            version = int(img.model.get("version") or 0)
            origin = {"origin": "segment", "sha256": img.model.get("sha256")}
            img.db.put_model(version, None, "served", origin)
        img.listeners.append(self._on_event)

    # --- state --------------------------------------------------------------------------

    @property
    def served(self) -> int:
        return next(m["version"] for m in self.img.db.models() if m["status"] == "served")

    def archive(self, version: int) -> Archive:
        if version not in self._archives:
            self._archives[version] = Archive(self.img.path, version, self.shape, self.tile)
        return self._archives[version]

    def describe(self) -> dict[str, Any]:
        """What ``GET …/model`` answers (``segloop.review.learning``)."""
        models = self.img.db.models()
        served = next(m for m in models if m["status"] == "served")
        updates = self.img.db.model_updates(last=20)
        return {
            "learning": True,
            "every": self.config.every,
            "pending_verdicts": len(self.pending),
            "served": _summary(served),
            "versions": [_summary(m) for m in models],
            "round": self.round,
            "updates": [{**u, "tiles": len(u["tiles"])} for u in updates],
            "last_update": updates[-1]["id"] if updates else 0,
            "seconds_verdict_to_update": self.latency_s[-50:],
        }

    # --- verdicts → rounds --------------------------------------------------------------

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        await self._end_learner()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def _on_event(self, event: dict[str, Any]) -> None:
        """An image event (any thread): a verdict counts toward the next round."""
        verdict = (event["type"] == "review" and event["state"] in ("accepted", "corrected")) or (
            event["type"] == "decision" and event["status"] == "approved"
        )
        if verdict and self.loop is not None:
            self.loop.call_soon_threadsafe(self._verdict, event.get("tile"))

    def _verdict(self, tile: list[int] | None) -> None:
        self.pending.append(time.time())
        if tile is not None:
            self.focus.append((tile[0], tile[1]))
        if len(self.pending) >= self.config.every:
            self.learn_now()

    def look(self, user_id: int, tile: tuple[int, int]) -> None:
        """A user's view is centred on ``tile`` (kept ``LOOK_S``; the re-prediction order)."""
        self.looking[user_id] = (tuple(tile), time.time())

    def learn_now(self, force: bool = False) -> bool:
        """Start a training round unless one runs, or no verdict is pending (``force``:
        even then, on every trusted tile; ``POST …/model/learn``)."""
        if self.round is not None or not (self.pending or force):
            return False
        self.round = {"state": "preparing", "started": time.time()}
        self._task = asyncio.ensure_future(self._guarded(self._train_round()))
        return True

    async def _guarded(self, work) -> None:
        try:
            await work
        except Exception as exc:  # a round's failure is logged and recorded, never fatal
            self.log(f"{self.img.name}: learning round failed: {exc}")
            self.img.notify({"type": "model", "event": "failed", "why": str(exc)})
        finally:
            ended, self.round, self.proc = self.round, None, None
            self.img.notify({"type": "model", "event": "done", "round": ended})
        if len(self.pending) >= self.config.every:
            self.learn_now()

    async def _train_round(self) -> None:
        loop = asyncio.get_running_loop()
        verdicts, self.pending, self.unserved = self.unserved + self.pending, [], []
        trusted = await loop.run_in_executor(None, training_set, self.img)
        if not trusted.tiles:
            self.log(f"{self.img.name}: no trusted corrections yet; nothing to learn")
            self.unserved = verdicts
            return
        from segloop.model.finetune import next_version

        version = next_version(self.repo / self.name)
        parent = self.served
        work = learn_dir(self.img.path) / "rounds" / f"v{version}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        index = await loop.run_in_executor(
            None,
            lambda: export_corrections(
                self.img.path, work / "corrections", tiles=trusted.tiles,
                labels=lambda ty, tx: self.img.read_chunk(SEG, 0, ty, tx),
            ),
        )  # fmt: skip
        n = len(index["items"])
        held = [i for i in range(n) if n >= HOLD_OUT_EVERY and i % HOLD_OUT_EVERY == 0]
        (work / "training_set.json").write_text(
            json.dumps(
                {
                    "tiles": [[*t, w] for t, w in sorted(trusted.tiles.items())],
                    "excluded": trusted.excluded,
                    "annotators": trusted.annotators,
                },
                indent=1,
            )
        )
        order = await loop.run_in_executor(None, self._order, version)
        job = Job(
            **{
                **self.config.job,
                "store": str(self.img.path),
                "workdir": str(work),
                "repository": str(self.repo),
                "name": self.name,
                "version": version,
                "parent": parent,
                "tiles": order,
                "corrections": str(work / "corrections"),
                "held_out": held,
            }
        )
        self.round.update(kind="learned", version=version, parent=parent, tiles=n)
        self.img.notify({"type": "model", "event": "training", "version": version, "tiles": n})
        await self._run(job, "learned", verdicts, None)

    def _order(self, version: int) -> list[tuple[int, int]]:
        """Tiles to predict with ``version``: every tile no human touched that does not
        show it yet, nearest to where reviewers look (their view centres, leased tiles
        and last verdicts) first, then the least certain."""
        made_by, doubt = self.img.tile_versions(), self.img.uncertainty()
        human = self.img.db.human()
        now = time.time()
        looked = [tile for tile, when in self.looking.values() if now - when < LOOK_S]
        focus = looked + list(self.focus) + list(self.img.db.leased())
        ny, nx = made_by.shape
        ys, xs = np.mgrid[0:ny, 0:nx]
        dist = np.full((ny, nx), 0.0)
        if focus:
            f = np.array(focus, float)
            dist = np.min(np.hypot(ys[..., None] - f[:, 0], xs[..., None] - f[:, 1]), axis=-1)
        order = np.lexsort((-np.nan_to_num(doubt, nan=0.0).ravel(), np.round(dist).ravel()))
        return [
            (int(ty), int(tx))
            for ty, tx in zip(*np.unravel_index(order, (ny, nx)), strict=True)
            if made_by[ty, tx] != version and (ty, tx) not in human
        ]

    # --- one learner process ------------------------------------------------------------

    async def _run(self, job: Job, kind: str, verdicts: list[float], user: dict | None) -> None:
        work = Path(job.workdir)
        (work / "job.json").write_bytes(encode(job))
        threads = str(job.threads)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        with open(work / "learner.log", "ab") as err:
            self.proc = proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "segloop.learn.worker", str(work / "job.json"),
                stdout=asyncio.subprocess.PIPE, stderr=err, env=env, limit=1 << 24,
            )  # fmt: skip
        self.round.update(pid=proc.pid, state="training" if job.corrections else "predicting")
        trained = job.corrections is None
        done = 0
        async for line in proc.stdout:
            event = json.loads(line)
            if event["event"] == "trained":
                trained = True
                self._trained(event, job)
                if not event["accepted"]:
                    continue
                self.round["state"] = "predicting"
            elif event["event"] == "batch":
                tiles = [(ty, tx) for ty, tx, _ in event["tiles"]]
                updated = await self._apply(job.version, tiles, kind, user)
                done += len(event["tiles"])
                self.round["progress"] = [done, len(job.tiles)]
                if verdicts and updated:
                    now = time.time()
                    self.latency_s += [round(now - t, 1) for t in verdicts]
                    verdicts = []
        rc = await proc.wait()
        self.unserved += verdicts  # a rejected or dead round: they wait for the next one
        if rc != 0 or not trained:
            self._died(job, rc, work)

    def _trained(self, event: dict[str, Any], job: Job) -> None:
        info = {k: event[k] for k in ("before", "after", "why", "tiles", "held_out", "steps")}
        info["seconds"] = event["seconds"]
        status = "served" if event["accepted"] else "rejected"
        self.img.db.put_model(job.version, job.parent, status, info)
        self.log(f"{self.img.name}: model v{job.version} {status}: {event['why']}")
        self.img.notify(
            {"type": "model", "event": status, "version": job.version, "why": event["why"]}
        )

    def _died(self, job: Job, rc: int | None, work: Path) -> None:
        """The learner ended without finishing its round: a version it made but did not
        report is set aside (never served); the served version stays."""
        made = self.repo / self.name / str(job.version)
        recorded = {m["version"] for m in self.img.db.models()}
        if job.corrections is not None and job.version not in recorded:
            if made.exists():
                (made.parent / "rejected").mkdir(exist_ok=True)
                os.replace(made, made.parent / "rejected" / str(job.version))
            tail = (work / "learner.log").read_text(errors="replace")[-2000:]
            self.img.db.put_model(
                job.version, job.parent, "failed", {"why": f"learner exit {rc}", "log": tail}
            )
        self.log(
            f"{self.img.name}: learner for v{job.version} ended (exit {rc}); "
            f"still serving v{self.served}"
        )
        self.img.notify({"type": "model", "event": "failed", "version": job.version, "rc": rc})

    async def _apply(
        self, version: int, tiles: list[tuple[int, int]], kind: str, user: dict | None
    ) -> list[tuple[int, int]]:
        """Show ``version``'s archived predictions of ``tiles`` (writer thread); record and
        announce the update."""
        loop = asyncio.get_running_loop()
        preds = await loop.run_in_executor(None, self.archive(version).read, tiles)
        updated = await asyncio.wrap_future(self.img.replace_tiles(preds, version, self._keep))
        if updated:
            uid = None if user is None else user["id"]
            update = self.img.db.add_model_update(version, kind, updated, uid)
            self.img.notify(
                {
                    "type": "model", "event": "updated", "version": version, "kind": kind,
                    "update": update, "tiles": [list(t) for t in updated],
                }
            )  # fmt: skip
        return updated

    def _keep(self, current: dict[tuple[int, int], Prediction]) -> None:
        """Archive what tiles showed before a new version replaces them (writer thread)."""
        by_version: dict[int, dict[tuple[int, int], Prediction]] = {}
        for tile, p in current.items():
            by_version.setdefault(p.version, {})[tile] = p
        for version, preds in by_version.items():
            archive = self.archive(version)
            held = archive.held()
            archive.write({t: p for t, p in preds.items() if not held[t]})

    async def _end_learner(self) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.terminate()
            with contextlib.suppress(ProcessLookupError):
                await proc.wait()

    # --- rollback -----------------------------------------------------------------------

    async def rollback(self, version: int, user: dict) -> dict[str, Any]:
        """Serve ``version`` again (one served before): newer versions are retired, tiles
        get its archived predictions back, and what it never predicted is predicted."""
        models = {m["version"]: m for m in self.img.db.models()}
        served = self.served
        if version not in models or models[version]["status"] not in ("served", "kept"):
            ever = sorted(v for v, m in models.items() if m["status"] in ("served", "kept"))
            raise LookupError(f"v{version} was never served; versions served so far: {ever}")
        if version == served:
            raise ValueError(f"v{version} is the version served now")
        if version > served:
            raise ValueError(f"v{version} is newer than the served v{served}; roll back only")
        if self._task is not None and not self._task.done():
            await self._end_learner()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        newer = [v for v, m in models.items() if v > version and m["status"] in ("served", "kept")]
        models_dir = self.repo / self.name
        (models_dir / "retired").mkdir(exist_ok=True)
        for v in newer:
            if (models_dir / str(v)).exists():
                os.replace(models_dir / str(v), models_dir / "retired" / str(v))
        self.img.db.set_model_status(newer, "retired")
        self.img.db.set_model_status([version], "served")
        if self.config.job.get("runtime") == "triton":
            from segloop.model.registry import triton_names
            from segloop.triton.server import load_version

            await asyncio.get_running_loop().run_in_executor(
                None, load_version, self.config.job["url"], triton_names(self.name).net, version
            )
        todo = await asyncio.get_running_loop().run_in_executor(None, self._order, version)
        held = self.archive(version).held()
        kept = [t for t in todo if held[t]]
        updated = await self._apply(version, kept, "rollback", user) if kept else []
        missing = [t for t in todo if not held[t]]
        self.log(f"{self.img.name}: {user['name']} rolled back to v{version}")
        self.img.notify(
            {"type": "model", "event": "rolled_back", "version": version, "user": user["name"]}
        )
        if missing:
            self.round = {"state": "preparing", "started": time.time(), "kind": "rollback"}
            work = learn_dir(self.img.path) / "rounds" / f"rollback-{int(time.time() * 1000)}"
            work.mkdir(parents=True)
            job = Job(
                **{
                    **self.config.job,
                    "store": str(self.img.path), "workdir": str(work),
                    "repository": str(self.repo), "name": self.name, "version": version,
                    "parent": None, "tiles": missing,
                }
            )  # fmt: skip
            self._task = asyncio.ensure_future(self._guarded(self._run(job, "rollback", [], user)))
        return {
            "served": version,
            "retired": newer,
            "restored": len(updated),
            "predicting": len(missing),
        }


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    """A model row as the API gives it: version, parent, status, created, and its scores."""
    info = m["info"]
    out = {k: m[k] for k in ("version", "parent", "status", "created")}
    if "after" in info:
        out["score"] = {
            "corrections_mean_iou": mean_iou(info["after"]["corrections"]),
            "in_distribution": info["after"]["in_distribution"],
        }
        out["parent_score"] = {
            "corrections_mean_iou": mean_iou(info["before"]["corrections"]),
            "in_distribution": info["before"]["in_distribution"],
        }
        out["trained_on"] = info.get("tiles")
    out["why"] = info.get("why")
    return out

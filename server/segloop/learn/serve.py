"""Wire continuous learning into a review server app (``segloop serve --learn``)."""

from __future__ import annotations

import os
from pathlib import Path

from aiohttp import web

from segloop.errors import UserError
from segloop.io.ome_zarr import read_record
from segloop.learn.loop import LearnConfig, Learner, check_repository
from segloop.model.registry import versions
from segloop.review import keys
from segloop.review.db import ReviewDB


def check(config: LearnConfig, stores: list[Path], log=print) -> None:
    """Before the server starts: every store's model can learn in the repository, whose
    newest version is the one the store shows (else Triton would serve another). A
    version newer than the served one that a learning round published but its server
    never recorded (the server died first) is set aside in ``rejected/``: never served."""
    for store in stores:
        model = read_record(store)["model"]
        check_repository(config.repository, model["name"])
        models = config.repository / model["name"]
        db = ReviewDB(store)
        try:
            known = {m["version"]: m["status"] for m in db.models()}
            served = next((v for v, status in known.items() if status == "served"), None)
            for v in versions(models) if served is not None else ():
                if v > served:
                    (models / "rejected").mkdir(exist_ok=True)
                    os.replace(models / str(v), models / "rejected" / str(v))
                    if v not in known:
                        db.put_model(v, served, "failed", {"why": "its server died first"})
                    log(f"{store.name}: set {model['name']} v{v} aside (rejected/): a round "
                        "published it but its server never served it")  # fmt: skip
        finally:
            db.close()
        shows = served if served is not None else model.get("version")
        newest = versions(models)[-1]
        if newest != shows:
            raise UserError(
                f"--learn: {store} shows {model['name']} v{shows} but the newest version in "
                f"{config.repository} is v{newest}; learning builds on what is served, so pass "
                f"a repository whose newest is v{shows} (--model-repository), or segment "
                f"the store again with v{newest}"
            )


def attach(config: LearnConfig, app: web.Application, log=print) -> None:
    """One ``Learner`` per image of ``app``, started and stopped with it."""
    for name, img in app[keys.IMAGES].items():
        app[keys.LEARNERS][name] = Learner(img, config, log)

    async def start(app: web.Application) -> None:
        for learner in app[keys.LEARNERS].values():
            await learner.start()

    async def stop(app: web.Application) -> None:
        for learner in app[keys.LEARNERS].values():
            await learner.stop()

    app.on_startup.append(start)
    app.on_shutdown.append(stop)

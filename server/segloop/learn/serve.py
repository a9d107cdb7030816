"""Wire continuous learning into a review server app (``segloop serve --learn``)."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from segloop.io.ome_zarr import read_record
from segloop.learn.loop import LearnConfig, Learner, check_repository
from segloop.review import keys


def check(config: LearnConfig, stores: list[Path]) -> None:
    """Before the server starts: every store's model can learn in the repository."""
    for store in stores:
        check_repository(config.repository, read_record(store)["model"]["name"])


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

"""Model versions over HTTP (``segloop serve --learn``, ``segloop.learn.loop``).

``GET …/model``: the served version and its validation score, every version with its
lineage and status, the round running and the last updates; without ``--learn`` only
the store's own model. ``GET …/model/updates?after=ID``: the updates since ``ID``, each
with the tiles it re-predicted (the UI marks them until looked at). ``POST
…/model/rollback`` ``{"version": N}`` (reviewer): serve version N again. ``POST
…/model/learn`` (reviewer): start a round now (on every trusted tile, even with no
verdict pending: after a restart). ``POST
…/model/focus`` ``{"tile": [ty, tx]}``: where a user looks (the re-prediction order).
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from aiohttp import web

from segloop.review import keys
from segloop.review.handlers import TileIndex, decode, json_error
from segloop.review.tiles import image_of


class Rollback(msgspec.Struct, forbid_unknown_fields=True):
    version: Annotated[int, msgspec.Meta(ge=0, lt=2**31)]


class Focus(msgspec.Struct, forbid_unknown_fields=True):
    tile: tuple[TileIndex, TileIndex]


def _learner(request: web.Request, required: bool = True):
    img = image_of(request)
    learner = request.app[keys.LEARNERS].get(img.name)
    if learner is None and required:
        raise json_error(409, "this server does not learn; start it with `segloop serve --learn`")
    return img, learner


async def get_model(request: web.Request) -> web.Response:
    img, learner = _learner(request, required=False)
    if learner is None:
        model = img.model
        return web.json_response(
            {"learning": False, "served": {"version": model.get("version"), "status": "served"}}
        )
    return web.json_response(learner.describe())


async def get_updates(request: web.Request) -> web.Response:
    img, learner = _learner(request, required=False)
    try:
        after = int(request.query.get("after", 0))
    except ValueError:
        raise json_error(400, "after must be an update id (an integer)") from None
    return web.json_response({"updates": img.db.model_updates(after) if learner else []})


async def post_rollback(request: web.Request) -> web.Response:
    _, learner = _learner(request)
    body = await decode(request, Rollback)
    try:
        out = await learner.rollback(body.version, request["user"])
    except LookupError as exc:
        raise json_error(404, str(exc)) from None
    except ValueError as exc:
        raise json_error(409, str(exc)) from None
    return web.json_response(out)


async def post_focus(request: web.Request) -> web.Response:
    """Where a user is looking (the level-0 tile at the centre of their view): the
    learner re-predicts the tiles nearest to it first. Ignored without --learn."""
    img, learner = _learner(request, required=False)
    body = await decode(request, Focus)
    ny, nx = img.grid(0)
    if not (body.tile[0] < ny and body.tile[1] < nx):
        raise json_error(404, "no such tile")
    if learner is not None:
        learner.look(request["user"]["id"], body.tile)
    return web.json_response({"learning": learner is not None})


async def post_learn(request: web.Request) -> web.Response:
    _, learner = _learner(request)
    if not learner.learn_now(force=True):
        raise json_error(409, "not started: a round is running")
    return web.json_response({"started": True, "round": learner.round}, status=202)

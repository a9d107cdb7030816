"""Edit, history, review-state, coverage, queue and live-update handlers."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Annotated, Literal

import msgspec
import numpy as np
from aiohttp import WSMsgType, web

from segloop.review import assist, keys, leases
from segloop.review import stats as review_stats
from segloop.review.db import EXPERTS, FLAG_REASONS, STATES, VerdictTaken
from segloop.review.edits import BadEdit, Edit, TooLarge, unpack
from segloop.review.image import Conflict, NoSuchEdit, NothingToDo, ReviewImage
from segloop.review.tiles import image_of

MAX_BODY = 1 << 20  # bytes


def json_error(status: int, message: str, headers=None, **extra) -> web.HTTPException:
    """An HTTP error whose body is ``{"error": message, **extra}`` (serialised, never
    formatted)."""
    cls = {
        400: web.HTTPBadRequest,
        401: web.HTTPUnauthorized,
        403: web.HTTPForbidden,
        404: web.HTTPNotFound,
        409: web.HTTPConflict,
        413: web.HTTPRequestEntityTooLarge,
        415: web.HTTPUnsupportedMediaType,
        500: web.HTTPInternalServerError,
        503: web.HTTPServiceUnavailable,
        507: web.HTTPInsufficientStorage,
    }[status]
    body = json.dumps({"error": message, **extra})
    kw = {"text": body, "content_type": "application/json", "headers": headers}
    if cls is web.HTTPRequestEntityTooLarge:
        return cls(max_size=MAX_BODY, actual_size=0, **kw)
    return cls(**kw)


async def decode(request: web.Request, kind: type):
    """Read and validate a JSON body as ``kind`` (msgspec), bounded in size; the body must
    be sent as ``Content-Type: application/json`` (an empty body needs none)."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise json_error(413, f"body larger than {MAX_BODY} bytes")
    # StreamReader.read(n) returns what has arrived so far, not the whole body: a large
    # body sent in several TCP segments would be cut (→ a bogus "malformed JSON")
    raw = bytearray()
    while len(raw) <= MAX_BODY and (part := await request.content.read(MAX_BODY + 1 - len(raw))):
        raw += part
    if len(raw) > MAX_BODY:
        raise json_error(413, f"body larger than {MAX_BODY} bytes")
    if raw and request.content_type != "application/json":
        raise json_error(415, "send the body as Content-Type: application/json")
    try:
        return msgspec.json.decode(raw or b"{}", type=kind)
    except msgspec.ValidationError as exc:
        raise json_error(400, f"invalid body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise json_error(400, f"malformed JSON: {exc}") from None


def _run(request: web.Request, fn, *args):
    return request.loop.run_in_executor(None, fn, *args)


def _writer(img: ReviewImage, fn, *args) -> asyncio.Future:
    """``fn(*args)`` on the image's writer thread, awaited without holding a pool thread."""
    return asyncio.wrap_future(img.submit(fn, *args))


# --- edits ------------------------------------------------------------------------------


async def post_edit(request: web.Request) -> web.Response:
    img = image_of(request)
    edit = await decode(request, Edit)
    user = request["user"]
    try:
        result = await asyncio.wrap_future(img.apply(edit, user))
    except TooLarge as exc:
        raise json_error(413, str(exc)) from None
    except BadEdit as exc:
        raise json_error(400, str(exc)) from None
    except Conflict as exc:
        raise json_error(
            409, "the chunks changed since you drew; rebase and retry", versions=exc.versions
        ) from None
    request.app[keys.METRICS].edits.labels(edit.op).inc()
    return web.json_response(result)


async def post_assist(request: web.Request) -> web.Response:
    """The copilot's proposal at a click or in a box (``segloop.review.assist``); nothing
    is changed: accepting it is an ordinary edit with ``op: "assist"``."""
    img = image_of(request)
    body = await decode(request, assist.Assist)
    try:
        return web.json_response(await _run(request, assist.preview, img, body))
    except TooLarge as exc:
        raise json_error(413, str(exc)) from None
    except BadEdit as exc:
        raise json_error(400, str(exc)) from None


async def get_pixel(request: web.Request) -> web.Response:
    """The label (and its class name) and the model's confidence at one level-0 pixel
    (the eyedropper)."""
    img = image_of(request)
    try:
        y, x = int(request.match_info["y"]), int(request.match_info["x"])
    except ValueError:
        raise json_error(404, "no such pixel") from None
    h, w = img.shape
    if not (0 <= y < h and 0 <= x < w):
        raise json_error(404, "no such pixel")
    t = img.tile

    def read() -> tuple[int, int]:
        return tuple(
            int(img.read_chunk(layer, 0, y // t, x // t)[y % t, x % t])
            for layer in ("segmentation", "confidence")
        )

    label, conf = await _run(request, read)
    return web.json_response(
        {"x": x, "y": y, "label": label, "class": img.classes[label], "confidence": conf / 255}
    )


async def undo(request: web.Request) -> web.Response:
    return await _undo_redo(request, "undo")


async def redo(request: web.Request) -> web.Response:
    return await _undo_redo(request, "redo")


async def _undo_redo(request: web.Request, op: str) -> web.Response:
    img = image_of(request)
    try:
        result = await asyncio.wrap_future(getattr(img, op)(request["user"]))
    except NothingToDo as exc:
        raise json_error(409, str(exc)) from None
    request.app[keys.METRICS].edits.labels(op).inc()
    return web.json_response(result)


async def history(request: web.Request) -> web.Response:
    img = image_of(request)
    try:
        limit = max(0, min(1000, int(request.query.get("limit", "100"))))
        before = max(0, min(2**62, int(request.query.get("before", str(2**62)))))
    except ValueError:
        raise json_error(400, "limit and before must be integers") from None
    return web.json_response(img.db.history(before, limit))


#: an edit larger than this is not sent to the browser whole (its before/after view)
MAX_DELTA_PIXELS = 1 << 21


async def edit_delta(request: web.Request) -> web.Response:
    """The pixels one edit changed, per level-0 chunk: flat indices (uint32 little-endian)
    and the values before and after (uint8), each base64 (the before/after view)."""
    img = image_of(request)
    edit_id = _edit_id(request)

    def read() -> dict | None:
        row = img.db.edit_delta(edit_id)
        if row is None:
            return None
        pixels, blob = row
        if pixels > MAX_DELTA_PIXELS:
            raise json_error(413, f"edit {edit_id} changed more than {MAX_DELTA_PIXELS} pixels")
        return {
            key: {"idx": _b64(idx.astype("<u4")), "before": _b64(before), "after": _b64(after)}
            for key, (idx, before, after) in unpack(blob).items()
        }

    chunks = await _run(request, read)
    if chunks is None:
        raise json_error(404, "no such edit")
    return web.json_response({"edit_id": edit_id, "chunks": chunks})


def _edit_id(request: web.Request) -> int:
    """The ``{edit_id}`` of the URL (404 unless a positive integer)."""
    try:
        edit_id = int(request.match_info["edit_id"])
        if not 0 < edit_id < 2**62:
            raise ValueError
    except ValueError:
        raise json_error(404, "no such edit") from None
    return edit_id


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(a.tobytes()).decode()


class Decision(msgspec.Struct, forbid_unknown_fields=True):
    decision: Literal["approve", "reject"]


async def decide(request: web.Request) -> web.Response:
    """Reviewer approves or rejects an annotator's proposed edit (reject reverts it)."""
    img = image_of(request)
    body = await decode(request, Decision)
    edit_id = _edit_id(request)
    try:
        result = await asyncio.wrap_future(img.decide(edit_id, body.decision, request["user"]))
    except NoSuchEdit:
        raise json_error(404, "no such edit") from None
    except NothingToDo as exc:
        raise json_error(409, str(exc)) from None
    user = request["user"]["name"]
    img.notify({"type": "decision", "edit_id": edit_id, "status": result["status"], "user": user})
    return web.json_response(result)


# --- review state -----------------------------------------------------------------------


class TileReview(msgspec.Struct, forbid_unknown_fields=True):
    state: Literal["unseen", "in_review", "accepted", "corrected", "flagged"]
    reason: Literal["unsure", "out_of_distribution", "bad_image_quality"] | None = None
    comment: str | None = None


def _tile(request: web.Request, img: ReviewImage) -> tuple[int, int]:
    try:
        ty, tx = int(request.match_info["ty"]), int(request.match_info["tx"])
    except ValueError:
        raise json_error(404, "no such tile") from None
    ny, nx = img.grid(0)
    if not (0 <= ty < ny and 0 <= tx < nx):
        raise json_error(404, "no such tile")
    return ty, tx


async def put_review(request: web.Request) -> web.Response:
    """Set a tile's review state. Annotators may mark tiles in review, flag them, and
    propose "corrected" (stored as ``correction_proposed``); only reviewers (and admins)
    accept, mark corrected, or change a verdict a reviewer gave."""
    img = image_of(request)
    ty, tx = _tile(request, img)
    body = await decode(request, TileReview)
    user = request["user"]
    expert = user["role"] in EXPERTS
    state = body.state
    if not expert and state == "accepted":
        raise json_error(403, "only reviewers accept tiles")
    if not expert and state == "corrected":
        state = "correction_proposed"
    if body.comment is not None and len(body.comment) > 2000:
        raise json_error(400, "comment longer than 2000 characters")

    try:
        await _writer(
            img, img.db.set_review, ty, tx, user["id"], state, body.reason, body.comment, not expert
        )
    except VerdictTaken as exc:
        raise json_error(
            403,
            f"tile {ty}/{tx} is {exc.state} by reviewer {exc.user}; "
            "only reviewers change a reviewer's verdict",
        ) from None
    event = {"type": "review", "tile": [ty, tx], "state": state, "user": user["name"]}
    img.notify(event)
    return web.json_response(event)


async def get_review(request: web.Request) -> web.Response:
    img = image_of(request)
    ty, tx = _tile(request, img)
    return web.json_response(img.db.review(ty, tx) or {"state": "unseen"})


async def coverage(request: web.Request) -> web.Response:
    """Review state per level-0 tile as a grid of state indices (see ``states``)."""
    img = image_of(request)
    ny, nx = img.grid(0)
    grid = np.zeros((ny, nx), np.uint8)
    for cy, cx, state in img.db.states():
        grid[cy, cx] = STATES.index(state)
    seconds = img.db.review_seconds()
    counts = {s: int((grid == i).sum()) for i, s in enumerate(STATES)}
    return web.json_response(
        {
            "states": list(STATES),
            "reasons": list(FLAG_REASONS),
            "grid": grid.tolist(),
            "counts": counts,
            "seconds": seconds,  # time reviewers spent on the tiles they decided
        }
    )


async def stats(request: web.Request) -> web.Response:
    """Per-user work and annotator–reviewer agreement (see ``segloop.review.stats``)."""
    img = image_of(request)
    users, agree = await asyncio.gather(
        _run(request, review_stats.user_stats, img), _run(request, review_stats.agreement, img)
    )
    return web.json_response({"users": users, "agreement": agree})


# --- work queue -------------------------------------------------------------------------


async def queue_next(request: web.Request) -> web.Response:
    img = image_of(request)
    user = request["user"]
    try:
        minutes = float(request.query.get("minutes", leases.LEASE_MINUTES))
    except ValueError:
        raise json_error(400, "minutes must be a number") from None
    if not leases.valid_minutes(minutes):
        raise json_error(400, f"minutes must be in (0, {leases.MAX_MINUTES}]")
    await _run(request, img.uncertainty)  # read once, off the writer thread
    out = await _writer(img, leases.lease_next, img, user, minutes)
    if out is None:
        return web.json_response({"tile": None, "remaining": 0})
    request.app[keys.METRICS].queue.labels(img.name).set(out["remaining"])
    return web.json_response(out)


TileIndex = Annotated[int, msgspec.Meta(ge=0, lt=2**31)]


class Release(msgspec.Struct, forbid_unknown_fields=True):
    tile: tuple[TileIndex, TileIndex]


async def queue_release(request: web.Request) -> web.Response:
    img = image_of(request)
    body = await decode(request, Release)

    released = await _writer(img, img.db.release, *body.tile, request["user"]["id"])
    return web.json_response({"released": released})


# --- live updates -----------------------------------------------------------------------


async def live(request: web.Request) -> web.WebSocketResponse:
    """WebSocket: chunk-version and review-state events of one image, as JSON."""
    img = image_of(request)
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue(maxsize=1000)

    def listener(event: dict) -> None:
        loop.call_soon_threadsafe(q.put_nowait, event)

    img.listeners.append(listener)  # before the handshake: no event can slip past
    ws = web.WebSocketResponse(heartbeat=30)
    try:
        await ws.prepare(request)
    except Exception:
        img.listeners.remove(listener)
        raise

    async def pump() -> None:
        while True:
            await ws.send_json(await q.get())

    task = asyncio.create_task(pump())
    request.app[keys.WEBSOCKETS][ws] = request["user"]["id"]  # closed if the user is revoked
    try:
        async for msg in ws:
            if msg.type == WSMsgType.ERROR:
                break
    finally:
        request.app[keys.WEBSOCKETS].pop(ws, None)
        task.cancel()
        img.listeners.remove(listener)
    return ws

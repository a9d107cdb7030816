"""The review app's state, as typed ``web.AppKey``s (``request.app[IMAGES]``)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from segloop.review.app import Metrics
    from segloop.review.db import ReviewDB
    from segloop.review.image import ReviewImage
    from segloop.review.tiles import EncodedTiles

#: image name → the open store
IMAGES: web.AppKey[dict[str, ReviewImage]] = web.AppKey("images")
#: the users' database: the first store's (one server, one set of users)
DB: web.AppKey[ReviewDB] = web.AppKey("db")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
OPENAPI: web.AppKey[dict[str, Any]] = web.AppKey("openapi")
#: the pool that encodes tiles on demand
LOOP_POOL: web.AppKey[ThreadPoolExecutor] = web.AppKey("loop_pool")
TILE_CACHE: web.AppKey[EncodedTiles] = web.AppKey("tile_cache")
#: [tile requests being encoded on demand right now] (the tile pack's builder waits)
RENDERING: web.AppKey[list[int]] = web.AppKey("rendering")
#: (html, content security policy) of the UI page
PAGE: web.AppKey[tuple[str, str]] = web.AppKey("page")
#: (method, canonical path) → the least role, or None for public routes
ROLES: web.AppKey[dict[tuple[str, str], str | None]] = web.AppKey("roles")
#: open WebSocket → its user's id (closed if the user is revoked)
WEBSOCKETS: web.AppKey[dict[web.WebSocketResponse, int]] = web.AppKey("websockets")
REVOCATIONS: web.AppKey[asyncio.Task] = web.AppKey("revocations")

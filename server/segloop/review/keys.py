"""The review app's state: typed ``web.AppKey``s (``request.app[IMAGES]``) and the two
small classes of that state that have no other home. Imports nothing of the server's
handlers, so every module may import it."""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from segloop.review.db import ReviewDB
from segloop.review.image import ReviewImage


class Metrics:
    """The Prometheus metrics of one server (its own registry)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "segloop_request_seconds",
            "request latency",
            ["route"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
        )
        self.tiles = Counter(
            "segloop_tiles_served", "tiles served", ["layer"], registry=self.registry
        )
        self.edits = Counter("segloop_edits", "edits applied", ["op"], registry=self.registry)
        self.queue = Gauge(
            "segloop_queue_depth", "unreviewed, unleased tiles", ["image"], registry=self.registry
        )


class EncodedTiles:
    """Encoded tiles in memory, least recently used dropped beyond ``budget`` bytes.

    Keys carry the chunk version, so an edited chunk's old tile is never served again."""

    def __init__(self, budget: int = 256 << 20) -> None:
        self.budget = budget
        self._tiles: OrderedDict[tuple, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            body = self._tiles.get(key)
            if body is not None:
                self._tiles.move_to_end(key)
            return body

    def put(self, key: tuple, body: bytes) -> None:
        with self._lock:
            old = self._tiles.pop(key, None)
            self._bytes += len(body) - (len(old) if old is not None else 0)
            self._tiles[key] = body
            while self._bytes > self.budget and len(self._tiles) > 1:
                self._bytes -= len(self._tiles.popitem(last=False)[1])


#: image name → the open store
IMAGES = web.AppKey("images", dict[str, ReviewImage])
#: the users' database: the first store's (one server, one set of users)
DB = web.AppKey("db", ReviewDB)
METRICS = web.AppKey("metrics", Metrics)
OPENAPI = web.AppKey("openapi", dict[str, Any])
#: the pool that encodes tiles on demand
LOOP_POOL = web.AppKey("loop_pool", ThreadPoolExecutor)
TILE_CACHE = web.AppKey("tile_cache", EncodedTiles)
#: [tile requests being encoded on demand right now] (the tile pack's builder waits)
RENDERING = web.AppKey("rendering", list[int])
#: (html, content security policy) of the UI page
PAGE = web.AppKey("page", tuple[str, str])
#: (method, canonical path) → the least role, or None for public routes
ROLES = web.AppKey("roles", dict[tuple[str, str], str | None])
#: open WebSocket → its user's id (closed if the user is revoked)
WEBSOCKETS = web.AppKey("websockets", dict[web.WebSocketResponse, int])
REVOCATIONS = web.AppKey("revocations", asyncio.Task)
#: image name → its ``segloop.learn.loop.Learner`` (``serve --learn``; empty otherwise)
LEARNERS = web.AppKey("learners", dict[str, Any])

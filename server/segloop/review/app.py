"""``segloop serve``: the review server (aiohttp). Routes are registered here, in one place.

Every route but ``/api/health`` and the page itself needs ``Authorization: Bearer
<token>`` (``?token=`` only for the WebSocket, which browsers cannot give headers; the
page takes it from its first URL into ``sessionStorage``); roles are cumulative: viewer <
annotator < reviewer < admin. ``/metrics`` also takes the token in
``SEGLOOP_METRICS_TOKEN`` (for a Prometheus scrape). Errors are JSON everywhere; every
response carries the security headers of ``SECURITY_HEADERS``.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import functools
import hashlib
import hmac
import json
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
from aiohttp import web
from prometheus_client import generate_latest

from segloop.assets import OSD_DIR, UI_DIR
from segloop.review import assist, handlers, keys, learning, raster, tiles
from segloop.review.check import DamagedChunk
from segloop.review.db import BUSY_S, ROLES, Busy, Full, ReviewDB, require_intact, translate
from segloop.review.edits import Edit
from segloop.review.handlers import json_error
from segloop.review.image import ReviewImage
from segloop.review.source_image import image_mode, relocate, verify_source
from segloop.review.tile_pack import remove_legacy

REVOKE_POLL_S = 1.0  # how often open WebSockets are checked against revoked users

#: (method, path, handler, minimum role or None for public)
ROUTES = [
    ("GET", "/", "index", None),
    ("GET", "/api/health", "health", None),
    ("GET", "/api/me", "me", "viewer"),
    ("GET", "/api/openapi.json", "openapi", "viewer"),
    ("GET", "/metrics", "metrics", None),  # a user's token or SEGLOOP_METRICS_TOKEN
    ("GET", "/api/images", tiles.list_images, "viewer"),
    ("GET", "/api/images/{image}", tiles.get_image, "viewer"),
    ("GET", "/api/images/{image}/versions", tiles.get_versions, "viewer"),
    ("GET", "/api/images/{image}/tiles/{layer}/{level}/{ty}/{tx}", tiles.get_tile, "viewer"),
    ("POST", "/api/images/{image}/edits", handlers.post_edit, "annotator"),
    ("GET", "/api/images/{image}/edits", handlers.history, "viewer"),
    ("GET", "/api/images/{image}/edits/{edit_id}/delta", handlers.edit_delta, "viewer"),
    ("POST", "/api/images/{image}/edits/{edit_id}/decision", handlers.decide, "reviewer"),
    ("POST", "/api/images/{image}/assist", handlers.post_assist, "annotator"),
    ("GET", "/api/images/{image}/pixels/{y}/{x}", handlers.get_pixel, "viewer"),
    ("POST", "/api/images/{image}/undo", handlers.undo, "annotator"),
    ("POST", "/api/images/{image}/redo", handlers.redo, "annotator"),
    ("GET", "/api/images/{image}/review/{ty}/{tx}", handlers.get_review, "viewer"),
    ("PUT", "/api/images/{image}/review/{ty}/{tx}", handlers.put_review, "annotator"),
    ("GET", "/api/images/{image}/coverage", handlers.coverage, "viewer"),
    ("GET", "/api/images/{image}/stats", handlers.stats, "viewer"),
    ("POST", "/api/images/{image}/queue/next", handlers.queue_next, "annotator"),
    ("POST", "/api/images/{image}/queue/release", handlers.queue_release, "annotator"),
    ("GET", "/api/images/{image}/live", handlers.live, "viewer"),
    ("GET", "/api/images/{image}/model", learning.get_model, "viewer"),
    ("GET", "/api/images/{image}/model/updates", learning.get_updates, "viewer"),
    ("POST", "/api/images/{image}/model/rollback", learning.post_rollback, "reviewer"),
    ("POST", "/api/images/{image}/model/learn", learning.post_learn, "reviewer"),
    ("POST", "/api/images/{image}/model/focus", learning.post_focus, "viewer"),
]


#: the one route that takes ``?token=`` (browsers cannot set a WebSocket's headers)
QUERY_TOKEN_ROUTES = {"/api/images/{image}/live"}
#: on every response (the page's Content-Security-Policy is set in ``index``)
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
}


def _token(request: web.Request, canonical: str | None) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        return auth[7:].strip()
    return request.query.get("token") if canonical in QUERY_TOKEN_ROUTES else None


@web.middleware
async def guard(request: web.Request, handler):
    """Authentication, roles, JSON errors (never a 5xx page with a traceback; a locked
    database → 503 + Retry-After, a full disk → 507), metrics."""
    route = request.match_info.route
    canonical = route.resource.canonical if route.resource else None
    need = request.app[keys.ROLES].get((route.method, canonical))
    t0 = time.perf_counter()
    try:
        if need is not None:
            token = _token(request, canonical)
            user = request.app[keys.DB].user_by_token(token) if token else None
            if user is None:
                raise json_error(
                    401, "missing or invalid token", headers={"WWW-Authenticate": "Bearer"}
                )
            if ROLES.index(user["role"]) < ROLES.index(need):
                raise json_error(403, f"needs role {need} or above; you are {user['role']}")
            request["user"] = user
        return await handler(request)
    except web.HTTPMethodNotAllowed as exc:
        if exc.content_type == "application/json":
            raise
        raise web.HTTPMethodNotAllowed(
            exc.method,
            exc.allowed_methods,
            text=json.dumps({"error": f"{exc.method} is not allowed here"}),
            content_type="application/json",
        ) from None
    except web.HTTPException as exc:
        if exc.content_type == "application/json" or exc.status < 400:
            raise
        raise json_error(exc.status, exc.reason, headers=_kept(exc)) from None  # 404, 413…
    except Exception as exc:
        raise _as_http(request, exc) from None
    finally:
        request.app[keys.METRICS].latency.labels(canonical or "unmatched").observe(
            time.perf_counter() - t0
        )


def _kept(exc: web.HTTPException) -> dict[str, str]:
    return {k: v for k, v in exc.headers.items() if k == "WWW-Authenticate"}


def _as_http(request: web.Request, exc: Exception) -> web.HTTPException:
    """An exception from a handler → its JSON HTTP error."""
    if isinstance(exc, sqlite3.Error):
        exc = translate(exc)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        exc = Full("disk full: no space left where the store is; free space and retry")
    if isinstance(exc, Busy):
        retry = str(int(BUSY_S))
        return json_error(503, str(exc), headers={"Retry-After": retry}, retry_after=BUSY_S)
    if isinstance(exc, Full):
        return json_error(507, str(exc))
    if isinstance(exc, DamagedChunk):  # the store, not the request: say which file
        request.app.logger.error("%s: %s", request.path, exc)
        return json_error(500, str(exc), damaged=True)
    # an unexpected bug: a JSON 500 and the log, no traceback out
    request.app.logger.error("error in %s", request.path, exc_info=exc)
    return json_error(500, type(exc).__name__)


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for k, v in SECURITY_HEADERS.items():
        response.headers.setdefault(k, v)


def ui_page() -> tuple[str, str]:
    """(html, Content-Security-Policy): ``review_ui/index.html`` with ``style.css`` and
    ``app.js`` inlined: the page's script then runs at once and its API requests overlap
    the viewer script's download (measured here: the first tile ~50 ms sooner than with the
    two files fetched). The policy allows exactly these two inline blocks (by hash)."""
    html = (UI_DIR / "index.html").read_text()
    hashes = {}
    for tag, name, wrap in (
        ('<link rel="stylesheet" href="/ui/style.css">', "style.css", "style"),
        ('<script src="/ui/app.js"></script>', "app.js", "script"),
    ):
        if html.count(tag) != 1:
            raise RuntimeError(f"review_ui/index.html must hold {tag} once")
        text = (UI_DIR / name).read_text().replace("</", "<\\/")  # no early </script>
        block = f"\n{text}"
        digest = base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()
        hashes[wrap] = f"'sha256-{digest}'"
        html = html.replace(tag, f"<{wrap}>{block}</{wrap}>")
    # 'unsafe-eval': tests/test_ui.py drives the page with Playwright's string predicates
    # (evaluated by eval); no injected <script> or handler attribute runs without a hash
    csp = (
        f"default-src 'self'; script-src 'self' 'unsafe-eval' {hashes['script']}; "
        f"style-src 'self' 'unsafe-inline'; img-src 'self' blob: data:; "
        "connect-src 'self' ws: wss:; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'"
    )
    return html, csp


async def index(request: web.Request) -> web.Response:
    """The browser UI (holds no data; everything it shows comes through the API)."""
    html, csp = request.app[keys.PAGE]
    return web.Response(
        text=html,
        content_type="text/html",
        headers={"Cache-Control": "no-cache", "Content-Security-Policy": csp},
    )


async def me(request: web.Request) -> web.Response:
    user = request["user"]
    return web.json_response({"name": user["name"], "role": user["role"]})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "images": list(request.app[keys.IMAGES])})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text: for any user's token, or the token in ``SEGLOOP_METRICS_TOKEN``."""
    token = _token(request, None) or ""
    scrape = os.environ.get("SEGLOOP_METRICS_TOKEN", "")
    if not (scrape and hmac.compare_digest(token, scrape)) and (
        not token or request.app[keys.DB].user_by_token(token) is None
    ):
        raise json_error(401, "missing or invalid token", headers={"WWW-Authenticate": "Bearer"})
    body = generate_latest(request.app[keys.METRICS].registry)
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[keys.OPENAPI])


def openapi_spec() -> dict:
    bodies = {  # request body of the POST / PUT routes, by how their path ends
        "/edits": Edit,
        "/assist": assist.Assist,
        "/review/{ty}/{tx}": handlers.TileReview,
        "/decision": handlers.Decision,
        "/queue/release": handlers.Release,
        "/model/rollback": learning.Rollback,
        "/model/focus": learning.Focus,
    }
    schemas, components = msgspec.json.schema_components(
        list(bodies.values()), ref_template="#/components/schemas/{name}"
    )
    bodies = dict(zip(bodies, schemas, strict=True))
    paths: dict = {}
    for method, path, _, role in ROUTES:
        op: dict = {"responses": {"200": {"description": "OK"}}, "parameters": []}
        for part in path.split("/"):
            if part.startswith("{"):
                name = part.strip("{}")
                integer = name in ("level", "ty", "tx", "edit_id", "y", "x")
                kind = "integer" if integer else "string"
                op["parameters"].append(
                    {"name": name, "in": "path", "required": True, "schema": {"type": kind}}
                )
        if role:
            op["security"] = [{"bearer": []}]
            op["responses"].update(
                {"401": {"description": "no token"}, "403": {"description": f"needs {role}"}}
            )
        if method in ("POST", "PUT"):
            body = next((v for k, v in bodies.items() if path.endswith(k)), None)
            if body is not None:
                op["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": body}},
                }
            op["responses"].update(
                {"400": {"description": "invalid body"}, "409": {"description": "conflict"}}
            )
        paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "segloop review API", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def create_app(stores: list[Path], tile_pack: bool = True, log=None) -> web.Application:
    """One app serving the given stores (image name = store folder name without .zarr);
    ``tile_pack``: encode every tile as segmented once, in the background (``tile_pack.py``,
    in the cache folder; a cache folder that cannot be written: no pack, a warning).
    ``app[keys.LEARNERS]`` is empty: ``segloop.learn.serve.attach`` fills it."""
    images = {}
    for store in stores:
        name = store.name.removesuffix(".zarr")
        images[name] = img = ReviewImage(store, name)
        remove_legacy(store)  # a pack inside the store (older segloop): the cache has it now
        if tile_pack:
            try:
                img.pack = tiles.tile_pack(img)
            except (OSError, sqlite3.Error) as exc:
                (log or print)(f"{name}: no tile pack ({exc}); tiles are encoded on demand")
    raster.warm_up()  # compiling holds the GIL: before serving, not during the first edit
    app = web.Application(middlewares=[guard], client_max_size=handlers.MAX_BODY)
    app.on_response_prepare.append(security_headers)
    app[keys.IMAGES] = images
    # users live in the first store's database (one server, one set of users)
    app[keys.DB] = next(iter(images.values())).db  # the first store's connection
    app[keys.METRICS] = keys.Metrics()
    app[keys.OPENAPI] = openapi_spec()
    app[keys.LOOP_POOL] = ThreadPoolExecutor(8, thread_name_prefix="segloop-tiles")
    app[keys.TILE_CACHE] = keys.EncodedTiles()
    app[keys.RENDERING] = [0]  # tile requests being encoded on demand right now
    app[keys.PAGE] = ui_page()
    local = {
        "health": health,
        "metrics": metrics,
        "openapi": openapi,
        "index": index,
        "me": me,
    }
    app[keys.ROLES] = {}
    for method, path, handler, role in ROUTES:
        fn = local[handler] if isinstance(handler, str) else handler
        route = app.router.add_route(method, path, fn)
        app[keys.ROLES][(method, route.resource.canonical)] = role

    async def close(app: web.Application) -> None:
        for img in app[keys.IMAGES].values():
            img.close()  # closes app[keys.DB] too
        app[keys.LOOP_POOL].shutdown(wait=False)

    if OSD_DIR.is_dir():
        app.router.add_static("/vendor/openseadragon", OSD_DIR)
    else:
        app.logger.warning("review UI: %s missing; run `make install` (npm)", OSD_DIR)
    app[keys.WEBSOCKETS] = {}  # open WebSocket → its user's id

    async def close_websockets(app: web.Application) -> None:
        app[keys.REVOCATIONS].cancel()
        for ws in list(app[keys.WEBSOCKETS]):
            await ws.close(code=1001, message=b"server shutdown")

    async def watch_revocations(app: web.Application) -> None:
        """Close the WebSockets of revoked users (``segloop users revoke``, any process)."""
        db: ReviewDB = app[keys.DB]
        while True:
            await asyncio.sleep(REVOKE_POLL_S)
            if not app[keys.WEBSOCKETS]:
                continue
            try:
                active = db.active_user_ids()
            except sqlite3.Error:
                continue  # the next round
            for ws, uid in list(app[keys.WEBSOCKETS].items()):
                if uid not in active:
                    await ws.close(code=4401, message=b"access revoked")

    async def start_watch(app: web.Application) -> None:
        app[keys.REVOCATIONS] = asyncio.create_task(watch_revocations(app))

    app.on_startup.append(start_watch)

    async def build_packs(app: web.Application) -> None:
        for img in app[keys.IMAGES].values():
            if img.pack is not None:
                img.pack.start(
                    functools.partial(tiles.render_packed, img), lambda: app[keys.RENDERING][0] > 0
                )

    app.on_startup.append(build_packs)
    app[keys.LEARNERS] = {}
    app.on_shutdown.append(close_websockets)
    app.on_cleanup.append(close)
    return app


def open_stores(paths: list[Path]) -> list[Path]:
    """Check every path is a finished segloop store (clear error otherwise)."""
    from segloop.errors import UserError
    from segloop.io.ome_zarr import read_record

    for p in paths:
        record = read_record(p) if p.is_dir() else None
        if record is None:
            raise UserError(
                f"{p} is not a segloop store (no segloop.json); make one with `segloop segment`"
            )
        if record.get("status") != "complete":
            raise UserError(f"{p} is not finished; run `segloop segment` again to complete it")
        require_intact(p)  # PRAGMA quick_check of review.sqlite
        _check_zarr(p)
    names = [p.name.removesuffix(".zarr") for p in paths]
    if len(set(names)) != len(names):
        raise UserError("two stores have the same name; rename one folder")
    return paths


def _check_zarr(store: Path) -> None:
    """``UserError`` unless the store's zarr metadata opens (every array of the image, the
    labels and the confidence)."""
    import zarr

    from segloop.errors import UserError
    from segloop.io.ome_zarr import array_path, read_record

    record = read_record(store)
    levels = int(record["grid"]["levels"])
    layers = ("segmentation", "confidence")
    if image_mode(record)["mode"] == "copy":
        layers = ("image", *layers)
    try:
        root = zarr.open_group(store, mode="r")
        for layer in layers:
            for level in range(levels):
                zarr.open_array(root.store, path=array_path(layer, level), mode="r")
    except Exception as exc:  # any damage: one clear line
        raise UserError(f"{store}: the zarr metadata is damaged ({exc})") from None


def run(
    stores: list[Path],
    host: str,
    port: int,
    log=print,
    tile_pack: bool = True,
    images: list[str] | None = None,
    setup: Callable[[web.Application], None] | None = None,
    check: Callable[[list[Path]], None] | None = None,
) -> None:
    """Serve until Ctrl-C. With no users yet, create an admin and print its login URL.
    ``images``: the moved inputs of source-mode stores, one per store in order
    (``--image``; checked by fingerprint, then written into each run record).
    ``check(stores)`` runs before anything is made (raise ``UserError`` to refuse);
    ``setup(app)`` extends the app before it serves (``segloop.learn.serve.attach``)."""
    import socket

    from segloop.errors import UserError
    from segloop.io.ome_zarr import read_record

    if images:
        if len(images) != len(stores):
            raise UserError(
                f"--image given {len(images)}× for {len(stores)} stores; give one per store, "
                "in the same order"
            )
        for store, image in zip(stores, images, strict=True):
            relocate(store, image, log)
    open_stores(stores)
    for store in stores:  # before any user is made: a refused start prints no token
        image = image_mode(read_record(store))
        if image["mode"] == "source":
            verify_source(store, image)  # moved or changed: one line naming --image
    if check is not None:
        check(stores)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UserError(
                f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port"
            ) from exc
    db = ReviewDB(stores[0])
    first = None if db.users() else db.add_user("admin", "admin")
    db.close()
    app = create_app(stores, tile_pack, log)
    if setup is not None:
        setup(app)
    url = f"http://{host}:{port}/"
    log(f"serving {', '.join(app[keys.IMAGES])} on {url}")
    for img in app[keys.IMAGES].values():
        if img.replayed:
            log(f"{img.name}: wrote {img.replayed} committed edits a crash had left out of zarr")
    if first:
        log(f"first start: created user 'admin'. Log in once with {url}?token={first}")
    web.run_app(app, host=host, port=port, print=None, access_log=None, shutdown_timeout=5)

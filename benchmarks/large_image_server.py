"""A tile server over ``large_image`` for ``segloop bench serve --vs-large-image``.

Runs in its own virtual environment (large-image[tiff] needs zarr < 3; see the Makefile's
``.venv-large-image``). The HTTP layer is the one segloop uses (aiohttp, tiles produced in
a pool of 8 threads), so the comparison isolates tile production: large_image's default
configuration (its own in-memory tile cache included) answering ``getTile(x, y, z)``.

    python benchmarks/large_image_server.py IMAGE PORT
    GET /tiles/{z}/{x}/{y}   → JPEG bytes as large_image returns them (z = 0 is coarsest)
    GET /health              → "ok"
"""

from __future__ import annotations

import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor

import large_image
from aiohttp import web


def main() -> None:
    image, port = sys.argv[1], int(sys.argv[2])
    source = large_image.open(image)
    pool = ThreadPoolExecutor(8)

    async def tile(request: web.Request) -> web.Response:
        z, x, y = (int(request.match_info[k]) for k in ("z", "x", "y"))
        loop = asyncio.get_running_loop()
        try:
            body = await loop.run_in_executor(pool, source.getTile, x, y, z)
        except large_image.exceptions.TileSourceXYZRangeError:
            raise web.HTTPNotFound() from None
        return web.Response(body=body, content_type="image/jpeg")

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/tiles/{z}/{x}/{y}", tile)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    main()

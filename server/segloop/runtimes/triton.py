"""``--runtime triton``: a model's ensemble on one or more Triton servers (``segloop`` for
the shipped UNet, ``NAME_tiles`` for a model added with ``segloop model add``).

uint8 windows go out and uint8 labels + confidence come back (pre, network and post run
on the server). An asyncio gRPC client (``tritonclient.grpc.aio``) on its own event-loop
thread keeps many requests in flight, spread over all URLs (fewest outstanding first).
When a server is on this host, tensors travel through system shared memory instead of
the socket. UNAVAILABLE is retried with exponential backoff; after that the job stops
with a one-line error and the same command resumes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import uuid
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from segloop.errors import UserError
from segloop.model.card import read_card
from segloop.model.registry import triton_names
from segloop.runtimes.base import TileRuntime

DOWN_S = 5.0  # an endpoint that answered UNAVAILABLE gets no requests for this long
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}


def _is_local(url: str) -> bool:
    return url.rsplit(":", 1)[0] in LOCAL_HOSTS


class _ShmSlot:
    """One system shared-memory region holding a request's input and both outputs."""

    def __init__(self, shape: tuple[int, int, int, int], core: tuple[int, int]) -> None:
        import tritonclient.utils.shared_memory as shm

        self.shape, self.core = shape, core
        self.in_bytes = int(np.prod(shape))
        self.out_bytes = shape[0] * core[0] * core[1]
        self.size = self.in_bytes + 2 * self.out_bytes
        self.name = f"segloop_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self.key = "/" + self.name
        self.handle = shm.create_shared_memory_region(self.name, self.key, self.size)
        self.registered: set[str] = set()

    def write(self, windows: np.ndarray) -> None:
        import tritonclient.utils.shared_memory as shm

        shm.set_shared_memory_region(self.handle, [np.ascontiguousarray(windows)])

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        import tritonclient.utils.shared_memory as shm

        b = self.shape[0]
        shape = (b, *self.core)
        labels = shm.get_contents_as_numpy(self.handle, np.uint8, shape, self.in_bytes)
        conf = shm.get_contents_as_numpy(
            self.handle, np.uint8, shape, self.in_bytes + self.out_bytes
        )
        return labels.copy(), conf.copy()

    def destroy(self) -> None:
        import tritonclient.utils.shared_memory as shm

        shm.destroy_shared_memory_region(self.handle)


class TritonRuntime(TileRuntime):
    """Client of the ensemble serving ``model_path``'s network (by its card's name).
    ``url``: "host:port[,host:port…]" (gRPC)."""

    name = "triton"

    def __init__(
        self,
        model_path: Path,
        threads: int,
        url: str = "localhost:8001",
        shm: str = "auto",
        retries: int = 6,
    ) -> None:
        self.urls = [u.strip() for u in url.split(",") if u.strip()]
        if not self.urls:
            raise UserError("--url needs at least one HOST:PORT of a Triton gRPC endpoint")
        if shm not in ("auto", "system", "none"):
            raise UserError(f"--triton-shm {shm!r}: choose auto, system or none")
        self.retries = retries
        self.names = triton_names(read_card(model_path)["name"])
        self.in_flight = 4 * len(self.urls)  # requests kept in flight (pipeline queue depth)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, daemon=True, name="segloop-triton"
        )
        self._thread.start()
        self.clients = self._call(self._connect())
        self.use_shm = {u: shm == "system" or (shm == "auto" and _is_local(u)) for u in self.urls}
        self._free: dict[tuple, list[_ShmSlot]] = {}
        self._slots: list[_ShmSlot] = []
        self._outstanding = dict.fromkeys(self.urls, 0)
        self._down_until = dict.fromkeys(self.urls, 0.0)  # endpoints taken out, until then
        self.served_version, halo = self._call(self._describe())
        self.card = self._card(model_path, self.served_version)
        if halo != self.card["halo"]:
            raise UserError(
                f"the server's {self.names.post} crops a halo of {halo} px but model "
                f"version {self.served_version} needs {self.card['halo']}"
            )
        self.halo = halo

    # --- setup -------------------------------------------------------------------------

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def _connect(self) -> dict:
        from tritonclient.grpc.aio import InferenceServerClient

        return {u: InferenceServerClient(u) for u in self.urls}

    async def _describe(self) -> tuple[int, int]:
        """(served network version, post halo), the same on every URL."""
        from tritonclient.utils import InferenceServerException

        seen = set()
        for url, client in self.clients.items():
            try:
                if not await client.is_model_ready(self.names.ensemble):
                    raise UserError(
                        f"Triton at {url} has no ready model {self.names.ensemble!r}; start "
                        "it with `segloop triton serve` or load the ensemble"
                    )
                meta = await client.get_model_metadata(self.names.net)
                config = await client.get_model_config(self.names.post, as_json=True)
            except InferenceServerException as exc:
                raise UserError(
                    f"cannot reach Triton at {url}: {exc.message()}; is "
                    "`segloop triton serve` running there?"
                ) from exc
            version = max(int(v) for v in meta.versions)
            halo = int(config["config"]["parameters"]["halo"]["string_value"])
            seen.add((version, halo))
        if len(seen) > 1:
            raise UserError(f"the servers in --url serve different model versions: {sorted(seen)}")
        return seen.pop()

    @staticmethod
    def _card(model_path: Path, version: int) -> dict:
        """Card of the served version: from the local repository when it has that version
        (same host / shared file system), else the local card marked as served remotely."""
        local = model_path.parent.parent / str(version) / "model.onnx"
        if local.exists():
            return read_card(local)
        card = read_card(model_path)
        card.update(version=version, sha256=f"triton:{card['name']}:{version}")
        return card

    # --- inference ---------------------------------------------------------------------

    def submit(self, windows: np.ndarray) -> Future:
        """(B, S, S, C) uint8 → Future of (labels, confidence), each (B, S-2h, S-2h) uint8."""
        return asyncio.run_coroutine_threadsafe(self._infer(windows), self.loop)

    def _up(self) -> list[str]:
        now = time.monotonic()
        return [u for u in self.urls if self._down_until[u] <= now]

    def _pick(self) -> str:
        """Least outstanding requests among the endpoints not taken out (if all are out,
        the one that comes back first)."""
        up = self._up() or [min(self.urls, key=self._down_until.__getitem__)]
        return min(up, key=self._outstanding.__getitem__)

    async def _infer(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """An endpoint answering UNAVAILABLE is taken out for ``DOWN_S`` and the request
        goes to another one at once; with none left, retries back off (0.25 → 4 s)."""
        from tritonclient.utils import InferenceServerException

        delay = 0.25
        for attempt in range(self.retries + 1):
            url = self._pick()
            self._outstanding[url] += 1
            try:
                return await self._infer_on(url, windows)
            except InferenceServerException as exc:
                status = str(exc.status() or "")
                if "UNAVAILABLE" not in status or attempt == self.retries:
                    raise UserError(
                        f"Triton at {url} failed: {exc.message()}; run the same "
                        "command again to resume"
                    ) from exc
                self._down_until[url] = time.monotonic() + DOWN_S
            finally:
                self._outstanding[url] -= 1
            if not self._up():
                await asyncio.sleep(delay)
                delay = min(delay * 2, 4.0)
        raise AssertionError("unreachable")

    async def _infer_on(self, url: str, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from tritonclient.grpc import InferInput, InferRequestedOutput

        client = self.clients[url]
        core = (windows.shape[1] - 2 * self.halo, windows.shape[2] - 2 * self.halo)
        inp = InferInput("TILES", list(windows.shape), "UINT8")
        outs = [InferRequestedOutput("LABELS"), InferRequestedOutput("CONFIDENCE")]
        if not self.use_shm[url]:
            inp.set_data_from_numpy(np.ascontiguousarray(windows))
            result = await client.infer(self.names.ensemble, [inp], outputs=outs)
            return result.as_numpy("LABELS"), result.as_numpy("CONFIDENCE")
        slot = await self._slot(url, windows.shape, core)
        try:
            slot.write(windows)
            inp.set_shared_memory(slot.name, slot.in_bytes, 0)
            outs[0].set_shared_memory(slot.name, slot.out_bytes, slot.in_bytes)
            outs[1].set_shared_memory(slot.name, slot.out_bytes, slot.in_bytes + slot.out_bytes)
            await client.infer(self.names.ensemble, [inp], outputs=outs)
            return slot.read()
        finally:
            self._free.setdefault((slot.shape, slot.core), []).append(slot)

    async def _slot(self, url: str, shape: tuple, core: tuple[int, int]) -> _ShmSlot:
        free = self._free.setdefault((tuple(shape), core), [])
        slot = free.pop() if free else None
        if slot is None:
            slot = _ShmSlot(tuple(shape), core)
            self._slots.append(slot)
        if url not in slot.registered:
            await self.clients[url].register_system_shared_memory(slot.name, slot.key, slot.size)
            slot.registered.add(url)
        return slot

    # --- teardown ----------------------------------------------------------------------

    async def _aclose(self) -> None:
        for slot in self._slots:
            for url in slot.registered:
                with contextlib.suppress(Exception):  # the server may be gone: nothing to undo
                    await self.clients[url].unregister_system_shared_memory(slot.name)
        for client in self.clients.values():
            await client.close()

    def close(self) -> None:
        try:
            self._call(self._aclose())
        finally:
            for slot in self._slots:
                slot.destroy()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)

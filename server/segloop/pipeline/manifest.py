"""Resume manifest: the list of finished shards.

A shard is listed only after all its arrays were written, so a killed job re-does at
most the shards in flight. Local stores: an append-only, fsync'd text file (a torn last
line from a kill during the append is ignored). Remote stores (object storage cannot
append): one empty object per finished shard under ``segloop.manifest.d/``. Both live in
the store's ``segloop/`` folder (``ome_zarr.own_key``; an older store's at its root).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from segloop.io.location import Location
from segloop.io.ome_zarr import own_key

MANIFEST = "segloop.manifest"
MARKERS = "segloop.manifest.d"

Key = tuple[int, int, int]  # (level, sy, sx)


def _parse(parts: list[str]) -> Key | None:
    if len(parts) == 3 and all(p.isdigit() for p in parts):
        return int(parts[0]), int(parts[1]), int(parts[2])
    return None


class Manifest:
    def __init__(self, store: Path | str | Location) -> None:
        self.loc = Location.of(store)
        self.done: set[Key] = set()
        self._fh = None
        self._lock = threading.Lock()  # writers add from a pool
        if self.loc.local:
            self.path = self.loc.path / own_key(self.loc, MANIFEST)
            if self.path.exists():
                lines = self.path.read_text().splitlines()
                self.done = {k for k in (_parse(ln.split()) for ln in lines) if k}
            self._fh = self.path.open("a")
        else:
            self.markers = own_key(self.loc, MARKERS)
            names = self.loc.list(self.markers)
            self.done = {k for k in (_parse(n.split("_")) for n in names) if k}

    def __contains__(self, key: Key) -> bool:
        return key in self.done

    def add(self, key: Key) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.write("{} {} {}\n".format(*key))
                self._fh.flush()
                os.fsync(self._fh.fileno())
            else:
                self.loc.write_bytes("{}/{}_{}_{}".format(self.markers, *key), b"")
            self.done.add(key)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()

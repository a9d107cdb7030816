"""Resume manifest: an append-only, fsync'd list of finished shards.

A shard is listed only after all its arrays were written, so a killed job re-does at
most the shards in flight. A torn last line (kill during the append) is ignored.
"""

from __future__ import annotations

import os
from pathlib import Path

MANIFEST = "segloop.manifest"

Key = tuple[int, int, int]  # (level, sy, sx)


class Manifest:
    def __init__(self, store: Path) -> None:
        self.path = store / MANIFEST
        self.done: set[Key] = set()
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                parts = line.split()
                if len(parts) == 3 and all(p.isdigit() for p in parts):
                    self.done.add((int(parts[0]), int(parts[1]), int(parts[2])))
        self._fh = self.path.open("a")

    def __contains__(self, key: Key) -> bool:
        return key in self.done

    def add(self, key: Key) -> None:
        self._fh.write("{} {} {}\n".format(*key))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.done.add(key)

    def close(self) -> None:
        self._fh.close()

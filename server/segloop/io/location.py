"""Where a store or an input lives: a local path or an fsspec URL (``s3://bucket/x.zarr``).

zarr does the array I/O either way; this is the little else segloop needs: small files
beside the arrays (the run record, manifest entries), existence checks and deletion.
Storage options (endpoint, credentials) come from ``$SEGLOOP_STORAGE_OPTIONS`` (JSON, set
by ``--storage-options``) on top of the usual environment variables of the filesystem
(``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, …).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path
from typing import Any

from segloop.errors import UserError


def is_url(where: str | Path) -> bool:
    return "://" in str(where) and not str(where).startswith("file://")


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """``--storage-options`` JSON (fsspec options, e.g. ``endpoint_url``) → dict."""
    try:
        options = json.loads(text or "{}")
    except ValueError:
        raise UserError("--storage-options is not valid JSON") from None
    if not isinstance(options, dict):
        raise UserError('--storage-options must be a JSON object, e.g. {"endpoint_url": "…"}')
    return options


class Location:
    """A local folder/file (``path``) or a remote one (``url`` + ``fs``); picklable, so
    Dask tasks receive it as it is, fsspec ``options`` included."""

    def __init__(self, where: str | Path, options: dict[str, Any] | None = None) -> None:
        self.local = not is_url(where)
        self.url = str(where).rstrip("/")
        self.path = Path(str(where).removeprefix("file://")) if self.local else None
        self.options = options or {}

    @classmethod
    def of(cls, where: str | Path | Location, options: dict[str, Any] | None = None) -> Location:
        """``where`` itself if it is a Location, else a new one with ``options``."""
        return where if isinstance(where, Location) else cls(where, options)

    def __str__(self) -> str:
        return str(self.path) if self.local else self.url

    @property
    def name(self) -> str:
        return self.path.name if self.local else self.url.rsplit("/", 1)[-1]

    @functools.cached_property
    def fs(self):
        """fsspec filesystem of a remote location."""
        import fsspec

        try:
            fs, _ = fsspec.core.url_to_fs(self.url, **self.options)
        except (ImportError, ValueError) as exc:
            raise UserError(f"{self.url}: {exc}") from None
        return fs

    def _key(self, name: str) -> str:
        return f"{self.url}/{name}" if name else self.url

    def exists(self, name: str = "") -> bool:
        if self.local:
            return (self.path / name).exists() if name else self.path.exists()
        try:
            return self.fs.exists(self._key(name))
        except OSError as exc:
            raise UserError(f"{self._key(name)}: {exc}") from None

    def read_bytes(self, name: str) -> bytes | None:
        """Bytes of ``name`` inside this location, or None when absent."""
        try:
            if self.local:
                return (self.path / name).read_bytes()
            return self.fs.cat_file(self._key(name))
        except FileNotFoundError:
            return None

    def write_bytes(self, name: str, data: bytes) -> None:
        """Replace ``name`` atomically: local write + fsync + rename; remote objects are
        replaced whole by one PUT."""
        if not self.local:
            self.fs.pipe_file(self._key(name), data)
            return
        tmp = self.path / (name + ".tmp")
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / name)

    def list(self, prefix: str) -> list[str]:
        """Names under the folder ``prefix`` (empty when it does not exist)."""
        if self.local:
            d = self.path / prefix
            return sorted(p.name for p in d.iterdir()) if d.is_dir() else []
        try:
            return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(self._key(prefix), detail=False))
        except FileNotFoundError:
            return []

    def is_empty_folder(self) -> bool:
        if self.local:
            return self.path.is_dir() and not any(self.path.iterdir())
        return not self.fs.ls(self.url, detail=False)

    def makedirs(self) -> None:
        if self.local:
            self.path.mkdir(parents=True)
        else:
            self.fs.makedirs(self.url, exist_ok=True)

    def remove(self) -> None:
        if not self.local:
            self.fs.rm(self.url, recursive=True)
        elif self.path.is_dir():
            shutil.rmtree(self.path)
        else:
            self.path.unlink()

    def zarr_store(self, read_only: bool = False):
        """What ``zarr.open_group`` / ``zarr.open`` take for this location."""
        if self.local:
            return str(self.path)
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(self.url, storage_options=self.options, read_only=read_only)

"""A server child process on a free port, ready once its health URL answers 200.

One helper for every place that starts ``segloop serve`` (or another server) and waits
for it: benchmarks and tests alike."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from segloop.triton.server import free_port


class ServerProcess:
    """Run ``cmd`` (``{port}`` replaced by a free port, or ``port``) until :meth:`stop`;
    the constructor returns once ``base + health`` answers 200, and raises
    ``RuntimeError`` with the server's stderr if it exits first or ``timeout_s`` passes.
    stderr goes to a file (``stderr_text()``), so a chatty server never blocks on a pipe."""

    def __init__(
        self,
        cmd: list[str],
        health: str = "/api/health",
        *,
        port: int | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        timeout_s: float = 120,
    ) -> None:
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.cmd = [str(c).replace("{port}", str(self.port)) for c in cmd]
        self._err = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=subprocess.DEVNULL,
            stderr=self._err,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )
        deadline = time.monotonic() + timeout_s
        while not self._healthy(self.base + health):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.cmd[:4]} exited {self.proc.returncode}:\n{self.stderr_text()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"{self.cmd[:4]} not ready in {timeout_s} s:\n{self.stderr_text()}"
                )
            time.sleep(0.1)

    @staticmethod
    def _healthy(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def stderr_text(self) -> str:
        """What the server wrote on stderr so far."""
        self._err.flush()
        self._err.seek(0)
        return self._err.read()

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        """Signal the server and wait for it; returns its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def close(self) -> None:
        """Stop the server and drop its stderr file."""
        self.stop()
        self._err.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

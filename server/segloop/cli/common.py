"""Pieces every command shares: sizes, progress, JSON lines, info lines, flags."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def parse_size(text: str) -> tuple[int, int]:
    """'8192' or '1500x1300' (height × width) → (h, w)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not N or HxW") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} is not N or HxW with N > 0")
    return parts[0], parts[1]


class Progress:
    """Rich progress bar on stderr (Mpx/s, ETA), or JSON lines on stdout with ``--json``."""

    def __init__(self, label: str, as_json: bool, quiet: bool) -> None:
        self.label, self.as_json, self.quiet = label, as_json, quiet
        self._bar = None
        self._last = 0.0
        self._t0 = time.perf_counter()
        self._start_px: int | None = None

    def __enter__(self) -> Progress:
        return self

    def _start_bar(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("Mpx"),
            TextColumn("{task.fields[rate]:.2f} Mpx/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=_stderr_console(),
        )
        self._bar.start()
        self._task = self._bar.add_task(self.label, total=None, rate=0.0)

    def __call__(self, done: int, total: int) -> None:
        if self._start_px is None:
            self._start_px = done
            if not (self.as_json or self.quiet):
                self._start_bar()
        elapsed = time.perf_counter() - self._t0
        rate = (done - self._start_px) / 1e6 / elapsed if elapsed > 0 else 0.0
        if self._bar is not None:
            self._bar.update(self._task, completed=done // 10**6, total=total // 10**6, rate=rate)
        elif self.as_json and (done == total or time.perf_counter() - self._last > 0.5):
            self._last = time.perf_counter()
            eta = (total - done) / 1e6 / rate if rate > 0 else None
            emit_json(
                {
                    "event": "progress",
                    "stage": self.label,
                    "done_px": done,
                    "total_px": total,
                    "mpx_s": round(rate, 3),
                    "eta_s": None if eta is None else round(eta, 1),
                }
            )

    def __exit__(self, exc_type, *exc) -> None:
        if self._bar is not None:
            if exc_type is not None:  # an error message follows: leave only that line
                self._bar.live.transient = True
            self._bar.stop()


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def emit_json(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def info(args: argparse.Namespace, text: str) -> None:
    """One line on stderr unless ``--quiet`` or ``--json``."""
    if not (args.quiet or getattr(args, "json", False)):
        print(text, file=sys.stderr)


def common(sp: argparse.ArgumentParser, json_flag: bool = True) -> None:
    """``--quiet`` and (unless ``json_flag`` is false) ``--json``."""
    sp.add_argument("--quiet", action="store_true", help="no progress or info output")
    if json_flag:
        sp.add_argument(
            "--json",
            action="store_true",
            help="one JSON object per progress event and a final summary",
        )


def path_or_url(text: str) -> Path | str:
    """A local path, or an fsspec URL kept as text (``Path`` would fold ``s3://``)."""
    from segloop.io.location import is_url

    return text if is_url(text) else Path(text)


def format_stats(stats: dict) -> str:
    """Stage table: busy, waiting for input, waiting for the next stage (seconds)."""
    wall = stats["wall_s"]
    lines = [
        f"{'stage':<8}{'busy s':>9}{'busy %':>8}{'wait in s':>11}{'wait out s':>12}{'items':>7}"
    ]
    for name, s in stats["stages"].items():
        pct = 100 * s["busy_s"] / wall if wall else 0
        lines.append(
            f"{name:<8}{s['busy_s']:>9.2f}{pct:>7.0f}%{s['wait_in_s']:>11.2f}"
            f"{s['wait_out_s']:>12.2f}{s['items']:>7}"
        )
    lines.append(
        f"wall {wall:.2f} s, {stats['mpx_s']} Mpx/s, {stats['threads']} threads, "
        f"batch {stats['batch']}"
    )
    return "\n".join(lines)

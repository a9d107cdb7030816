"""``segloop`` command line: one module per command group, each with ``register``.
User errors print one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import logging
import sys

from segloop.cli import bench, demo, model, model_add, review, segment, triton
from segloop.errors import UserError

EXIT_USER_ERROR = 2
GROUPS = (demo, segment, model, model_add, bench, review, triton)


class _HelpFormatter(argparse.HelpFormatter):
    """Help that states each option's default, where it has a real one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            not action.option_strings
            or action.default in (None, False, argparse.SUPPRESS)
            or "default" in text
        ):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """Every (sub)command's parser: defaults shown in ``--help``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The ``segloop`` parser, assembled from each group's ``register``."""
    p = _Parser(
        prog="segloop",
        description="Seam-free segmentation of gigapixel images into "
        "OME-Zarr, with browser review and a human-in-the-loop.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # tifffile logs what it finds wrong in a damaged file before raising; the reader turns
    # that into our one-line error, so the log lines would only repeat it as noise
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"segloop: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("segloop: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``serve``, ``users``, ``check``, ``export-corrections``: the review side of a store."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from datetime import datetime
from pathlib import Path

from segloop.cli.common import common, emit_json, info
from segloop.errors import UserError
from segloop.review.db import ROLES

#: review server port: not 8000–8002, which tritonserver takes by default
SERVE_PORT = 8080


def cmd_serve(args: argparse.Namespace) -> int:
    from segloop.review.app import run

    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    setup = check = None
    if args.learn:
        from segloop.learn import serve as learning

        config = learn_config(args)
        check = functools.partial(learning.check, config, log=log)
        setup = functools.partial(learning.attach, config, log=log)
    elif args.runtime != "onnx" or args.url:
        raise UserError("--runtime and --url are for --learn (how the learner predicts)")
    run(
        args.stores,
        args.host,
        args.port,
        log=log,
        tile_pack=not args.no_tile_pack,
        images=args.image,
        setup=setup,
        check=check,
    )
    return 0


def learn_config(args: argparse.Namespace):
    """``serve --learn``'s settings, checked (``segloop.learn.loop.LearnConfig``)."""
    from segloop.learn.loop import LearnConfig
    from segloop.model.registry import repository

    if args.every < 1:
        raise UserError("--every must be at least 1 (verdicts per learning round)")
    if args.learn_steps < 1:
        raise UserError("--learn-steps must be at least 1")
    if not 0 < args.learn_lr < 1:
        raise UserError("--learn-lr must be in (0, 1)")
    if args.learn_threads < 1:
        raise UserError("--learn-threads must be at least 1")
    if args.runtime == "triton" and not args.url:
        raise UserError("--runtime triton needs --url HOST:PORT (Triton's gRPC address)")
    job = {
        "steps": args.learn_steps,
        "lr": args.learn_lr,
        "threads": args.learn_threads,
        "priority": args.learn_priority,
        "memory_mb": args.learn_memory_mb,
        "runtime": args.runtime,
        "url": args.url,
    }
    return LearnConfig(repository(args.model_repository), args.every, job)


def cmd_users(args: argparse.Namespace) -> int:
    from segloop.review.app import open_stores
    from segloop.review.db import ReviewDB

    open_stores([args.store])
    db = ReviewDB(args.store)
    try:
        if args.action == "add":
            if not args.name or args.role not in ROLES:
                raise UserError(f"users add needs NAME and --role {'|'.join(ROLES)}")
            if any(u["name"] == args.name for u in db.users()):
                raise UserError(f"user {args.name!r} exists; revoke it first or pick another")
            token = db.add_user(args.name, args.role)
            info(args, f"added {args.name} ({args.role}); log in at {args.url}?token={token}")
            info(args, "(the address of the running `segloop serve`; --url if it differs)")
            info(args, "bearer token for the API:")
            print(token)
        elif args.action == "list":
            for u in db.users():
                state = "revoked" if u["revoked"] else "active"
                print(f"{u['name']}\t{u['role']}\t{state}")
        else:
            if not args.name or not db.revoke(args.name):
                raise UserError(f"no active user {args.name!r}")
            info(args, f"revoked {args.name}")
    finally:
        db.close()
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """One line per problem on stdout; exit 1 if any, 0 if the store is intact."""
    from segloop.review.check import check_store

    report = check_store(args.store)
    for line in report.problems:
        print(f"{args.store}: {line}")
    for line in report.notes:
        info(args, f"note: {line}")
    verdict = f"{len(report.problems)} problems" if report.problems else "intact"
    info(args, f"{args.store}: {verdict} ({report.arrays} arrays, {report.shards} shards read)")
    return 1 if report.problems else 0


def cmd_export_corrections(args: argparse.Namespace) -> int:
    from segloop.review.export import export_corrections

    since = None
    if args.since:
        try:
            since = float(args.since)
        except ValueError:
            try:
                since = datetime.fromisoformat(args.since).timestamp()
            except ValueError:
                raise UserError(
                    f"--since {args.since!r}: give an ISO date/time (2026-11-25T10:00) "
                    "or Unix seconds"
                ) from None
    index = export_corrections(
        args.store, args.output, args.approved_only, since, overwrite=args.overwrite
    )
    items = index["items"]
    if args.json:
        emit_json({"event": "done", "output": str(args.output), "tiles": len(items)})
    else:
        info(
            args,
            f"wrote {len(items)} tiles to {args.output} "
            f"({sum(i['changed_px'] for i in items)} changed pixels)",
        )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``serve``, ``users``, ``check`` and ``export-corrections``."""
    s = sub.add_parser("serve", help="review server for one or more stores (browser + API)")
    s.add_argument("stores", type=Path, nargs="+")
    s.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0 = all interfaces)"
    )
    s.add_argument(
        "--port",
        type=int,
        default=SERVE_PORT,
        help="port (not 8000, which tritonserver takes by default)",
    )
    s.add_argument(
        "--no-tile-pack",
        action="store_true",
        help="do not encode the tiles ahead into the tile pack ($SEGLOOP_CACHE/tile-packs/)",
    )
    s.add_argument(
        "--image",
        action="append",
        metavar="PATH",
        help="the input a store reads its image from, moved since `segloop segment` (checked "
        "by fingerprint, then kept in the store's segloop.json); once per store, in order",
    )
    g = s.add_argument_group("continuous learning (--learn; see segloop.learn)")
    g.add_argument(
        "--learn",
        action="store_true",
        help="fine-tune on the reviewers' verdicts as they come, serve the new version if it "
        "validates, re-predict the unreviewed tiles",
    )
    g.add_argument("--every", type=int, default=5, metavar="K", help="verdicts per round")
    g.add_argument(
        "--runtime", choices=["onnx", "triton"], default="onnx", help="how the learner predicts"
    )
    g.add_argument("--url", help="Triton's gRPC HOST:PORT (--runtime triton, explicit mode)")
    g.add_argument(
        "--model-repository",
        type=Path,
        help="where new versions are written (default: $SEGLOOP_MODEL_REPOSITORY or the "
        "shipped one); must be writable",
    )
    g.add_argument("--learn-steps", type=int, default=120, help="optimiser steps per round")
    g.add_argument("--learn-lr", type=float, default=5e-4, help="peak learning rate")
    g.add_argument(
        "--learn-threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="CPU threads of the learner; it runs at idle priority (SCHED_IDLE), so the "
        "server's threads always come first",
    )
    g.add_argument(
        "--learn-memory-mb", type=int, default=6144, help="address-space limit of the learner"
    )
    g.add_argument(
        "--learn-priority",
        choices=["idle", "low", "normal"],
        default="idle",
        help="the learner's CPU priority: idle (SCHED_IDLE: only cores nothing else wants), "
        "low (nice 19), normal (as the server; a learner at idle priority on a machine "
        "busy with other work may wait long)",
    )
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("users", help="review-server users: add, list, revoke")
    s.add_argument("action", choices=["add", "list", "revoke"])
    s.add_argument("name", nargs="?")
    s.add_argument("--role", choices=ROLES, help="each role includes the ones before it")
    s.add_argument("--store", type=Path, required=True, help="the store whose users to manage")
    s.add_argument(
        "--url",
        default=f"http://127.0.0.1:{SERVE_PORT}/",
        help="the review server's address, for the login URL users add prints",
    )
    common(s, json_flag=False)
    s.set_defaults(func=cmd_users)

    s = sub.add_parser(
        "check", help="full integrity check of a store: database, zarr metadata, every chunk"
    )
    s.add_argument("store", type=Path, help="a segloop store")
    common(s, json_flag=False)
    s.set_defaults(func=cmd_check)

    s = sub.add_parser(
        "export-corrections", help="reviewed tiles of a store → training pairs (npz + index)"
    )
    s.add_argument("store", type=Path, help="a reviewed segloop store")
    s.add_argument("output", type=Path, help="folder for index.json + tiles/*.npz")
    s.add_argument(
        "--approved-only",
        action="store_true",
        help="only tiles a reviewer accepted/corrected with no pending annotator proposal",
    )
    s.add_argument("--since", help="only tiles changed since (ISO date/time or Unix seconds)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing export")
    common(s)
    s.set_defaults(func=cmd_export_corrections)

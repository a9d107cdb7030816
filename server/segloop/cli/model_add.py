"""``model add`` and ``models``: bring your own ONNX network, list the repository."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from segloop.cli.common import common, emit_json, info
from segloop.errors import UserError


def _floats(flag: str, text: str | None) -> list[float] | None:
    """'0.485,0.456,0.406' → floats (None stays None)."""
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"{flag} {text!r}: give numbers separated by commas") from None


def _names(text: str) -> list[str]:
    return [c.strip() for c in text.split(",")]


def cmd_model_add(args: argparse.Namespace) -> int:
    from segloop.model.add import add_model, parse_color
    from segloop.model.card import read_card

    t0 = time.perf_counter()
    path = add_model(
        args.model,
        args.name,
        _names(args.classes),
        colors=[parse_color(c) for c in args.colors.split(",")] if args.colors else None,
        mean=_floats("--mean", args.mean),
        std=_floats("--std", args.std),
        scale=args.scale,
        channels=args.channels,
        mpp=args.mpp,
        output=args.output,
        repo=args.repository,
    )
    card = read_card(path)
    summary = {
        "event": "done",
        "model": str(path),
        "name": card["name"],
        "version": card["version"],
        "multiple_of": card["input"]["multiple_of"],
        "receptive_radius": card["receptive_radius"],
        "halo": card["halo"],
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if args.json:
        emit_json(summary)
    else:
        info(
            args,
            f"wrote {path} ({card['name']} v{card['version']}): downsampling "
            f"{summary['multiple_of']}, receptive-field radius ≤ {card['receptive_radius']} px, "
            f"halo {card['halo']} px; use it with `segloop segment … --model {card['name']}`",
        )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from segloop.model.registry import list_models, repository

    rows = list_models(args.repository)
    if args.json:
        for row in rows:
            emit_json(row)
        return 0
    if not rows:
        print(f"no models in {repository(args.repository)}")
        return 0
    print(f"{'name':<20}{'versions':<10}{'halo':>5}{'mpp':>7}  {'input':<6}classes")
    for r in rows:
        vs = ",".join(map(str, r["versions"]))
        if not r["card"]:
            print(f"{r['name']:<20}{vs:<10}  (no segloop model card: `segloop model add`)")
            continue
        mpp = "-" if r["mpp"] is None else f"{r['mpp']:g}"
        print(
            f"{r['name']:<20}{vs:<10}{r['halo']:>5}{mpp:>7}  {r['channels']:<6}"
            f"{','.join(r['classes'])}"
        )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``model add`` and ``models``."""
    m = sub.add_parser("model", help="bring your own ONNX segmentation model").add_subparsers(
        dest="model_command", required=True
    )
    s = m.add_parser(
        "add",
        help="measure an ONNX network's halo and write it into the model repository",
        description="Validate MODEL.onnx ((N, C, H, W) → (N, classes, H, W) scores), find "
        "its downsampling factor, measure its receptive field through ONNX Runtime and "
        "write it as the next version of NAME (Triton folders, model card).",
    )
    s.add_argument("model", type=Path, help="the network, ONNX, with dynamic N, H, W")
    s.add_argument("--name", required=True, help="model name in the repository")
    s.add_argument("--classes", required=True, help="class names, comma separated (class 0 first)")
    s.add_argument("--colors", help="#rrggbb[aa] per class, comma separated (default: a palette)")
    s.add_argument("--mean", help="R,G,B on the 0–1 scale (pixel/255), or one value for gray")
    s.add_argument("--std", help="R,G,B on the 0–1 scale, or one value for gray")
    s.add_argument(
        "--scale", type=float, help="input = pixel × SCALE instead of --mean/--std (default 1/255)"
    )
    s.add_argument(
        "--channels",
        choices=("RGB", "BGR", "gray"),
        help="what the network takes (default: gray for a 1-channel input, else RGB)",
    )
    s.add_argument("--mpp", type=float, help="µm per pixel the network was trained at")
    s.add_argument(
        "--output",
        choices=("logits", "probabilities"),
        default="logits",
        help="what the network emits per pixel",
    )
    s.add_argument(
        "--repository",
        type=Path,
        help="model repository (default: $SEGLOOP_MODEL_REPOSITORY, else the shipped one)",
    )
    common(s)
    s.set_defaults(func=cmd_model_add)

    s = sub.add_parser("models", help="list the models in the repository")
    s.add_argument("--repository", type=Path, help="default: $SEGLOOP_MODEL_REPOSITORY or shipped")
    s.add_argument("--json", action="store_true", help="one JSON object per model")
    s.set_defaults(func=cmd_models)

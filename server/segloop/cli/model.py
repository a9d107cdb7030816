"""``train`` and ``finetune``: the models segloop makes."""

from __future__ import annotations

import argparse
from pathlib import Path

from segloop.cli.common import common, emit_json, info
from segloop.errors import UserError


def cmd_train(args: argparse.Namespace) -> int:
    from segloop.model.card import model_card, write_card_markdown
    from segloop.model.train import export_onnx, train

    out: Path = args.output
    if (out / "model.onnx").exists() and not args.overwrite:
        raise UserError(f"{out}/model.onnx exists; pass --overwrite or choose another folder")
    model, trained = train(
        steps=args.steps, batch=args.batch, seed=args.seed, log=lambda s: info(args, s)
    )
    card = model_card(model, trained, version=args.version)
    export_onnx(model, out / "model.onnx", card)
    write_card_markdown(card, out / "MODEL_CARD.md")
    info(args, f"wrote {out}/model.onnx; held-out IoU {trained['held_out_iou']}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from segloop.model.card import read_card
    from segloop.model.finetune import finetune, publish
    from segloop.model.registry import resolve_model

    if args.epochs < 1:
        raise UserError("--epochs must be at least 1")
    if not 0 <= args.replay < 1:
        raise UserError("--replay must be in [0, 1)")
    if not 0 < args.lr < 1:
        raise UserError("--lr must be in (0, 1)")
    model_path = resolve_model(args.model, args.repository)
    repository = args.repository or model_path.parents[2]
    model, tuned = finetune(
        model_path,
        args.corrections,
        epochs=args.epochs,
        replay=args.replay,
        lr=args.lr,
        seed=args.seed,
        log=lambda s: info(args, s),
    )
    name = read_card(model_path)["name"]
    onnx_path = publish(model, tuned, repository, name)
    version = int(onnx_path.parent.name)
    if args.triton:
        from segloop.model.registry import triton_names
        from segloop.triton.server import load_version

        load_version(args.triton, triton_names(name).net, version)
        info(args, f"{args.triton}: {triton_names(name).net} v{version} loaded")
    if args.json:
        emit_json(
            {
                "event": "done",
                "model": str(onnx_path),
                "version": version,
                "before": tuned["before"],
                "after": tuned["after"],
            }
        )
    else:
        info(args, f"wrote {onnx_path} (v{version}); after: {tuned['after']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train`` and ``finetune``."""
    s = sub.add_parser("train", help="train the UNet on synthetic data and export ONNX")
    s.add_argument("output", type=Path, help="version folder, e.g. model_repository/segloop_unet/2")
    s.add_argument("--steps", type=int, default=700)
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--version", type=int, default=1)
    s.add_argument("--overwrite", action="store_true")
    common(s, json_flag=False)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("finetune", help="fine-tune on exported corrections → next model version")
    s.add_argument(
        "--model",
        help="model to start from: NAME (its newest version) or a model.onnx path; any model "
        "`segloop model add` wrote, or the shipped UNet (default)",
    )
    s.add_argument("--corrections", type=Path, required=True, help="export-corrections folder")
    s.add_argument("--epochs", type=int, default=30)
    s.add_argument(
        "--replay",
        type=float,
        default=0.75,
        help="share of synthetic in-distribution patches (the shipped UNet only: added "
        "models train on their corrections alone)",
    )
    s.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (one-cycle)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--repository", type=Path, help="model repository (default: the --model's own)")
    s.add_argument("--triton", metavar="URL", help="then load it on this Triton (gRPC HOST:PORT)")
    common(s)
    s.set_defaults(func=cmd_finetune)

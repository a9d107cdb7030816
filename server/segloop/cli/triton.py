"""``triton serve``: the Triton Inference Server on segloop's model repository."""

from __future__ import annotations

import argparse
from pathlib import Path

from segloop.cli.common import common, info


def cmd_triton_serve(args: argparse.Namespace) -> int:
    from segloop.assets import model_repository
    from segloop.triton.server import ServerOptions, serve

    opts = ServerOptions(
        model_repository=args.model_repository or model_repository(),
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        explicit=args.model_control_mode == "explicit",
        load=args.load_model or ["segloop"],
        log_verbose=args.log_verbose,
        host=args.host,
        config_name=args.model_config_name,
    )
    return serve(opts, log=lambda s: info(args, s))


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``triton serve``."""
    t = sub.add_parser("triton", help="Triton Inference Server").add_subparsers(
        dest="triton", required=True
    )
    s = t.add_parser("serve", help="run tritonserver on the model repository until Ctrl-C")
    s.add_argument(
        "--model-repository",
        type=Path,
        default=None,
        help="default: the repository shipped with segloop",
    )
    s.add_argument("--http-port", type=int, default=8000)
    s.add_argument("--grpc-port", type=int, default=8001)
    s.add_argument("--metrics-port", type=int, default=8002)
    s.add_argument(
        "--model-control-mode",
        choices=["none", "explicit"],
        default="none",
        help="explicit: load/unload models (new versions) through the API",
    )
    s.add_argument(
        "--load-model",
        action="append",
        default=None,
        help="explicit mode: model to load at start (default: segloop)",
    )
    s.add_argument("--log-verbose", type=int, default=0)
    s.add_argument(
        "--host",
        default="127.0.0.1",
        help="address HTTP, gRPC and metrics bind to (default: loopback only; 0.0.0.0 = all)",
    )
    s.add_argument(
        "--model-config-name",
        help="each model's configs/NAME.pbtxt instead of config.pbtxt (e.g. gpu)",
    )
    common(s, json_flag=False)
    s.set_defaults(func=cmd_triton_serve)

"""Build TensorRT plans (``model.plan``) from the repository's ONNX versions.

For the official Triton container (``--model-config-name=tensorrt``). A plan only runs on
the GPU model and TensorRT version that built it, so each plan is stamped with both
(``model.plan.json``) and rebuilt when they differ. fp16, one dynamic profile: batch
1..16, square windows 96²..1120² (tile + 2 halo), optimised for 4 × 608².

``python -m segloop.runtimes.tensorrt_plans /models`` — needs the ``tensorrt`` package and a GPU;
neither exists on the machines this project is developed on, so this has not run here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PROFILE = {"min": (1, 3, 96, 96), "opt": (4, 3, 608, 608), "max": (16, 3, 1120, 1120)}


def stamp() -> dict[str, str]:
    """What a plan is valid for: TensorRT version and GPU name."""
    import tensorrt as trt
    import torch

    return {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(0)}


def build_plan(onnx_path: Path, plan_path: Path) -> None:
    """Parse ``onnx_path``, build an fp16 engine with the dynamic profile, write it."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT cannot parse it: {errors}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    profile.set_shape(network.get_input(0).name, *PROFILE.values())
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"{onnx_path}: TensorRT engine build failed (see the log above)")
    tmp = plan_path.with_suffix(".plan.partial")
    tmp.write_bytes(bytes(engine))
    tmp.replace(plan_path)


def ensure_plan(onnx_path: Path) -> tuple[Path, bool]:
    """``model.plan`` beside ``onnx_path``, built unless one stamped for this GPU and
    TensorRT exists; returns (plan, built)."""
    current = stamp()
    plan = onnx_path.with_name("model.plan")
    meta = plan.with_suffix(".plan.json")
    if plan.exists() and meta.exists() and json.loads(meta.read_text()) == current:
        return plan, False
    print(
        f"building {plan} for {current['gpu']} (TensorRT {current['tensorrt']}) …", file=sys.stderr
    )
    build_plan(onnx_path, plan)
    meta.write_text(json.dumps(current))
    return plan, True


def build_missing(repo: Path, model: str = "segloop_unet") -> list[Path]:
    """Plans for every version of ``model``; returns the ones built now."""
    plans = [ensure_plan(p) for p in sorted((repo / model).glob("[0-9]*/model.onnx"))]
    return [plan for plan, built in plans if built]


if __name__ == "__main__":
    build_missing(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/models"))

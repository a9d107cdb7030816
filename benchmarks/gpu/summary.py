"""Final phase: ``gpu_<device>.json`` + ``.md`` from the phase files in ``--out``.

Keys (issue 15): ``device``, ``end_to_end_mpx_s``, ``model_only_mpx_s``, ``efficiency``
(end to end ÷ best model-only), ``gpu_busy``, ``kernel_pre_fraction_of_copy``,
``kernel_post_fraction_of_copy`` (kernel GB/s ÷ the torch device copy of the ceilings
phase), ``vs_monai`` (end to end ÷ MONAI), plus the targets and every phase's file. A
phase that failed leaves its keys null and is listed under ``missing``. ``--results``
also copies both files there (the committed ``benchmarks/results/``; never in a
rehearsal).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import device_name, rehearsal, slug

PHASES = ("env", "ceilings", "kernels", "model", "e2e", "monai")
TARGETS = {
    "efficiency": 0.9,
    "gpu_busy": 0.9,
    "kernel_pre_fraction_of_copy": 0.7,
    "kernel_post_fraction_of_copy": 0.7,
    "vs_monai": 3.0,
    "end_to_end_mpx_s": 1000.0,
}


def ratio(a, b) -> float | None:
    """a ÷ b to 3 significant digits; None when either is missing."""
    return float(f"{a / b:.3g}") if a is not None and b else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--results", type=Path, help="also copy the two files here")
    args = ap.parse_args()
    ph = {}
    for name in PHASES:
        f = args.out / f"{name}.json"
        ph[name] = json.loads(f.read_text()) if f.exists() else {}
    get = lambda p, k: ph[p].get(k)  # noqa: E731
    e2e, mo = get("e2e", "end_to_end_mpx_s"), get("model", "model_only_mpx_s")
    copy = get("ceilings", "copy_gb_s")
    device = device_name()
    result = {
        "device": device,
        "rehearsal": rehearsal(),
        "end_to_end_mpx_s": e2e,
        "model_only_mpx_s": mo,
        "efficiency": ratio(e2e, mo),
        "gpu_busy": get("e2e", "gpu_busy"),
        "gpu_busy_source": get("e2e", "gpu_busy_source"),
        "kernel_pre_fraction_of_copy": ratio(get("kernels", "pre_gb_s"), copy),
        "kernel_post_fraction_of_copy": ratio(get("kernels", "post_gb_s"), copy),
        "vs_monai": ratio(e2e, get("monai", "monai_mpx_s")),
        "monai_mpx_s": get("monai", "monai_mpx_s"),
        "copy_gb_s": copy,
        "matmul_tflop_s": get("ceilings", "matmul_tflop_s"),
        "kernel_device": get("kernels", "kernel_device"),
        "targets": TARGETS,
        "missing": [p for p in PHASES if not ph[p]],
        "phases": ph,
    }
    name = f"gpu_{slug(device)}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    label = " (CPU REHEARSAL: CPU torch + numba CUDA simulator; not GPU numbers)"
    rows = [
        ("end to end (segloop segment CLI)", e2e, "Mpx/s", "≥ 1000"),
        ("model-only, best of eager / CUDA-graphed", mo, "Mpx/s", ""),
        ("efficiency = end to end ÷ model-only", result["efficiency"], "", "≥ 0.9"),
        ("GPU busy", result["gpu_busy"], result["gpu_busy_source"] or "", "≥ 0.9"),
        ("pre kernel ÷ device copy", result["kernel_pre_fraction_of_copy"], "", "≥ 0.7"),
        ("post kernel ÷ device copy", result["kernel_post_fraction_of_copy"], "", "≥ 0.7"),
        ("MONAI sliding window, same device + weights", result["monai_mpx_s"], "Mpx/s", ""),
        ("vs MONAI = end to end ÷ MONAI", result["vs_monai"], "", "≥ 3"),
        ("device copy", copy, "GB/s", ""),
        (f"{get('ceilings', 'matmul_dtype')} matmul", result["matmul_tflop_s"], "TFLOP/s", ""),
    ]
    md = [
        f"# GPU benchmark, {device}{label if rehearsal() else ''}",
        "",
        f"`bash benchmarks/gpu/run_all.sh{' --rehearse' if rehearsal() else ''}`, "
        f"{ph['env'].get('date', '')}. Model-only by batch: "
        + ", ".join(
            f"b{r['batch']} {r['eager_mpx_s']} eager / {r['graphed_mpx_s']} graphed"
            for r in ph["model"].get("rows", [])
        )
        + ".",
        "",
        "| measure | value | unit / source | target |",
        "|---|---|---|---|",
        *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows),
        "",
        f"Missing phases: {', '.join(result['missing']) or 'none'}.",
        "",
    ]
    (args.out / f"{name}.md").write_text("\n".join(md))
    print(json.dumps({k: v for k, v in result.items() if k != "phases"}, indent=2))
    if args.results and not rehearsal():
        args.results.mkdir(parents=True, exist_ok=True)
        for ext in ("json", "md"):
            shutil.copy(args.out / f"{name}.{ext}", args.results / f"{name}.{ext}")


if __name__ == "__main__":
    main()

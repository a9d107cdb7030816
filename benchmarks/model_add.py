"""`segloop model add` time, and `segment` throughput with added models vs the shipped one.

Networks added (random seeded weights, exported to ONNX without a card):
- ``unet_again``: the shipped UNet's own ONNX with its card stripped, added with the same
  normalisation: the perturbation-measured radius against the card's gradient-measured
  one, and its labels against the shipped run (same weights);
- ``monai_unet``: MONAI's residual UNet (16–128 channels, 3 stride-2 levels, batch norm);
- ``tiny``: 4 strided and dilated convolutions (the test suite's ``Strided``).

Each is segmented ``--rounds`` times, interleaved (after one warm-up run of the shipped
model: numba JIT, page cache), on a 2048² synthetic slide, ONNX Runtime on the CPU,
default options; the fastest run counts.

    python benchmarks/model_add.py [--size 2048] [--rounds 2] [--save benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import psutil
import torch
import zarr

from segloop.bench.segment import cpu_busy_s, machine
from segloop.model.add import add_model
from segloop.model.card import read_card
from segloop.pipeline.segment import SegmentOptions, default_model, segment
from segloop.synth import SYNTH_MPP, write_ome_tiff

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_model_add import Strided, _export  # the tests' networks

CLASSES = ["background", "tissue", "nucleus"]


def _monai_unet() -> torch.nn.Module:
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    return UNet(
        2, 3, 3, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2, norm="batch"
    )


def _stripped(tmp: Path) -> Path:
    proto = onnx.load(str(default_model()))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp / "unet_again.onnx"))
    return tmp / "unet_again.onnx"


def _timed_segment(image: Path, out: Path, model: Path, px: int) -> dict:
    """One segment run: wall s, Mpx/s, own CPU s per Mpx, CPU s other processes used."""
    busy0, own0 = cpu_busy_s(), sum(psutil.Process().cpu_times()[:2])
    t0 = time.perf_counter()
    segment(image, out, SegmentOptions(model=model, overwrite=True))
    wall = time.perf_counter() - t0
    own = sum(psutil.Process().cpu_times()[:2]) - own0
    return {
        "wall_s": round(wall, 3),
        "mpx_s": round(px / 1e6 / wall, 3),
        "cpu_s_per_mpx": round(own / (px / 1e6), 3),
        "foreign_cpu_s": round(max(0.0, cpu_busy_s() - busy0 - own), 1),
    }


def run(size: int, rounds: int, tmp: Path) -> dict:
    image = tmp / "slide.ome.tif"
    write_ome_tiff(image, size, size, seed=11, compression="zlib")
    repo = tmp / "repository"
    sources = {
        "unet_again": (_stripped(tmp), {"mean": [0.5] * 3, "std": [0.25] * 3}),
        "monai_unet": (_export(_monai_unet(), 3, tmp / "monai_unet.onnx"), {}),
        "tiny": (_export(Strided(3, 3), 3, tmp / "tiny.onnx"), {}),
    }
    shipped = default_model()
    segment(image, tmp / "warm.zarr", SegmentOptions(model=shipped))  # not timed
    result: dict = {"machine": machine(), "size": size, "rounds": rounds}
    result["load_avg_before"] = os.getloadavg()
    card = read_card(shipped)
    rows = {"shipped segloop_unet": {"halo": card["halo"], "radius": card["receptive_radius"],
                                     "multiple_of": card["input"]["multiple_of"]}}  # fmt: skip
    models = {"shipped segloop_unet": shipped}
    for name, (source, opts) in sources.items():
        t0 = time.perf_counter()
        models[name] = add_model(source, name, CLASSES, mpp=SYNTH_MPP, repo=repo, **opts)
        add_s = time.perf_counter() - t0
        card = read_card(models[name])
        rows[name] = {
            "add_s": round(add_s, 3),
            "probe_s": card["probe"]["seconds"],
            "halo": card["halo"],
            "radius": card["receptive_radius"],
            "needed": card["probe"]["needed"],
            "multiple_of": card["input"]["multiple_of"],
            "onnx_mb": round(source.stat().st_size / 2**20, 2),
        }
    runs: dict[str, list[dict]] = {name: [] for name in models}
    for _ in range(rounds):  # interleaved, so a burst of foreign load hits all alike
        for name, model in models.items():
            runs[name].append(_timed_segment(image, tmp / f"{name}.zarr", model, size * size))
    for name, rs in runs.items():
        rows[name].update(
            wall_s=min(r["wall_s"] for r in rs),
            mpx_s=max(r["mpx_s"] for r in rs),
            cpu_s_per_mpx=min(r["cpu_s_per_mpx"] for r in rs),
            foreign_cpu_s=round(sum(r["foreign_cpu_s"] for r in rs), 1),
            runs=rs,
        )
    labels = {k: zarr.open_array(tmp / f"{k}.zarr/labels/segmentation/0")[...]
              for k in ("shipped segloop_unet", "unet_again")}  # fmt: skip
    result["unet_again_label_agreement"] = float(
        np.mean(labels["shipped segloop_unet"] == labels["unet_again"])
    )
    result["rows"] = rows
    result["load_avg_after"] = os.getloadavg()
    return result


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"# model add + segment, {r['size']}², onnx, CPU",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB. Load average before "
        f"{r['load_avg_before'][0]:.2f}, after {r['load_avg_after'][0]:.2f} (a VM shared "
        f"with other engineers' jobs); {r['rounds']} interleaved runs per model after one "
        "warm-up run of the shipped model. Mpx/s: the fastest run; own CPU s/Mpx: the "
        "lowest (this process's CPU time per output Mpx: the steadier figure when others "
        "load the VM); other CPU s: what other processes used during all runs of that "
        "model (per-run figures in the JSON).",
        "",
        "| model | ONNX MB | model add s (probe s) | factor | radius px | need px | halo px "
        "| segment Mpx/s | own CPU s/Mpx | other CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in r["rows"].items():
        add = f"{row['add_s']} ({row['probe_s']})" if "add_s" in row else "— (trained)"
        lines.append(
            f"| {name} | {row.get('onnx_mb', '—')} | {add} | {row['multiple_of']} | "
            f"{row['radius']} | {row.get('needed', '—')} | {row['halo']} | {row['mpx_s']} | "
            f"{row['cpu_s_per_mpx']} | {row['foreign_cpu_s']} |"
        )
    lines += [
        "",
        "`unet_again` = the shipped UNet's ONNX with its card removed, added again (the "
        "shipped row's radius is its card's, measured by gradient); its labels agree "
        f"with the shipped run on {r['unet_again_label_agreement']:.6%} of pixels. need = "
        "the context windows aligned to the factor need; halo = need + 10 % (≥ 4 px), "
        "rounded up to the factor. Segment: default options (tile 512, one window per "
        "shard), ONNX Runtime, all cores.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--save", type=Path)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        r = run(a.size, a.rounds, Path(d))
    print(markdown(r))
    if a.save:
        a.save.mkdir(parents=True, exist_ok=True)
        stem = a.save / f"model_add_cpu{r['machine']['cores']}"
        stem.with_suffix(".json").write_text(json.dumps(r, indent=1))
        stem.with_suffix(".md").write_text(markdown(r))


if __name__ == "__main__":
    main()

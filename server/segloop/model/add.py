"""``segloop model add``: bring any ONNX segmentation network into a model repository.

1. **Validate** the graph: one input (N, C, H, W) with C = 3 (RGB, BGR) or 1 (gray) and
   dynamic N, H, W; its first output (N, K, H, W) per-pixel scores, K = the classes.
2. **Wrap** it so every runtime sees the shipped UNet's contract: input ``image``
   (N, 3, H, W) float32, normalised RGB; output ``logits`` (N, K, H, W) float32. BGR
   networks get a channel swap, gray ones the luminance 0.299 R + 0.587 G + 0.114 B (exact
   for gray images, whose three channels are equal), probability outputs a ``log``
   (softmax of log p is p, so labels and confidence are the network's own).
3. **Measure** the downsampling factor (the smallest power of two whose odd multiples the
   network maps to the same H, W) and the receptive field by perturbation through ONNX
   Runtime: one row (then column) of a random image is changed, at each phase modulo
   the factor, and every output row (column) that moves at all, bit for bit, reads it.
   From that, the context windows aligned to the factor need (``probe``); halo = that
   + 10 % (≥ 4 px), rounded up to the factor. A tiled run with
   that halo is checked against the whole-image run before anything is written; a
   network that fails (not shift-equivariant at that factor) is tried at twice the factor.
4. **Write** ``NAME/<next version>/`` (model.onnx with the card in ``metadata_props``,
   the python-backend shim, MODEL_CARD.md), ``NAME/config.pbtxt`` (python backend over
   ONNX Runtime) and ``NAME/configs/onnxruntime.pbtxt`` (native backend), plus
   ``NAME_pre``, ``NAME_post`` and the ensemble ``NAME_tiles`` (uint8 windows in, labels
   and confidence out, as ``segloop`` serves the shipped UNet).
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from segloop.errors import UserError
from segloop.model.card import lineage, write_card
from segloop.model.registry import NAME_RE, SHIPPED, repository, triton_names, versions

CHANNELS = ("RGB", "BGR", "gray")
OUTPUTS = ("logits", "probabilities")
LUMINANCE = (0.299, 0.587, 0.114)
#: downsampling factors tried, smallest first
FACTORS = (1, 2, 4, 8, 16, 32, 64, 128)
#: the probe image grows until the receptive field fits inside it, up to this side (px)
MAX_PROBE = 2048
#: perturbed images per ONNX Runtime call while probing (bounds the probe's memory)
PROBES_PER_RUN = 8
#: class colours when --colors is not given (class 0 transparent: the background)
PALETTE = (
    (0, 0, 0, 0),
    (236, 124, 186, 255),
    (60, 40, 200, 255),
    (46, 160, 67, 255),
    (255, 160, 0, 255),
    (0, 170, 200, 255),
    (200, 40, 40, 255),
    (140, 90, 40, 255),
    (120, 120, 120, 255),
    (190, 190, 30, 255),
)
RESERVED = {"segloop", "segloop_pre", "segloop_post", SHIPPED}
#: the network's own nodes and initializers inside the stored graph (the rest is the wrapper)
NET_PREFIX = "net/"
Run = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Signature:
    """The network's image input and score output: names, static channel counts (None:
    dynamic) and element types (onnx.TensorProto codes)."""

    input: str
    output: str
    in_channels: int | None
    out_channels: int | None
    in_type: int
    out_type: int


def _dims(value_info: onnx.ValueInfoProto) -> list[int | None]:
    return [
        d.dim_value if d.HasField("dim_value") else None
        for d in value_info.type.tensor_type.shape.dim
    ]


def signature(proto: onnx.ModelProto, source: Path) -> Signature:
    """The graph's (N, C, H, W) input and first (N, K, H, W) output, or a UserError."""
    g = proto.graph
    weights = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in weights]
    if len(inputs) != 1:
        raise UserError(f"{source}: the model has {len(inputs)} inputs; segloop feeds one image")
    inp, out = inputs[0], g.output[0]
    di, do = _dims(inp), _dims(out)
    if len(di) != 4 or len(do) != 4:
        raise UserError(
            f"{source}: input {inp.name} has rank {len(di)}, output {out.name} rank {len(do)}; "
            "segloop needs (N, C, H, W) in and (N, classes, H, W) out"
        )
    fixed = [n for n, d in zip("NHW", (di[0], di[2], di[3]), strict=True) if d is not None]
    if fixed:
        raise UserError(
            f"{source}: input {inp.name} has a fixed {', '.join(fixed)} ({di}); export it with "
            "dynamic batch, height and width (torch.onnx.export dynamic_axes)"
        )
    return Signature(
        inp.name,
        out.name,
        di[1],
        do[1],
        inp.type.tensor_type.elem_type,
        out.type.tensor_type.elem_type,
    )


def _part(nodes: list, inits: list, inp: tuple, out: tuple, opset: int, ir: int) -> onnx.ModelProto:
    """A small graph (``inp``, ``out`` = (name, elem type, channels)) to compose with."""

    def vi(name: str, elem: int, c: int | str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, elem, ["batch", c, "height", "width"])

    graph = helper.make_graph(nodes, "segloop_part", [vi(*inp)], [vi(*out)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)


def canonical(proto: onnx.ModelProto, sig: Signature, channels: str, kind: str) -> onnx.ModelProto:
    """``proto`` behind the segloop contract: ``image`` (N, 3, H, W) float32 normalised
    RGB → ``logits`` (N, K, H, W) float32 (see the module docstring)."""
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    ir, f32 = proto.ir_version, TensorProto.FLOAT
    c_in = 1 if channels == "gray" else 3
    k = sig.out_channels or "classes"
    nodes, inits = [], []
    src = "image"
    if channels == "BGR":
        inits.append(numpy_helper.from_array(np.array([2, 1, 0], np.int64), "bgr"))
        nodes.append(helper.make_node("Gather", [src, "bgr"], ["swapped"], axis=1))
        src = "swapped"
    elif channels == "gray":
        w = np.array(LUMINANCE, np.float32).reshape(1, 3, 1, 1)
        inits.append(numpy_helper.from_array(w, "luminance"))
        nodes.append(helper.make_node("Conv", [src, "luminance"], ["gray"]))
        src = "gray"
    nodes.append(helper.make_node("Cast", [src], ["net_in"], to=sig.in_type))
    pre = _part(nodes, inits, ("image", f32, 3), ("net_in", sig.in_type, c_in), opset, ir)
    nodes, inits = [helper.make_node("Cast", ["net_out"], ["scores"], to=f32)], []
    if kind == "probabilities":  # log p, floored so that p = 0 stays finite
        inits.append(numpy_helper.from_array(np.array(1e-30, np.float32), "floor"))
        nodes += [
            helper.make_node("Max", ["scores", "floor"], ["floored"]),
            helper.make_node("Log", ["floored"], ["logits"]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["scores"], ["logits"]))
    post = _part(nodes, inits, ("net_out", sig.out_type, k), ("logits", f32, k), opset, ir)
    net = onnx.compose.add_prefix(proto, NET_PREFIX)
    body = onnx.compose.merge_models(pre, net, io_map=[("net_in", f"{NET_PREFIX}{sig.input}")])
    whole = onnx.compose.merge_models(
        body, post, io_map=[(f"{NET_PREFIX}{sig.output}", "net_out")], outputs=["logits"]
    )
    onnx.checker.check_model(whole)
    return whole


def session(proto: onnx.ModelProto, threads: int) -> Run:
    """(B, 3, H, W) float32 → (B, K, H, W) float32 through ONNX Runtime on the CPU."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 4  # probes that fail on purpose would log errors
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def _up(n: int, m: int) -> int:
    return -(-n // m) * m


def downsampling(run: Run, classes: int, source: Path) -> int:
    """Smallest factor m whose odd multiples (h = m·q, w = h + 2m) come back (K, h, w)."""
    seen = []
    for m in FACTORS:
        h = m * (-(-64 // m) | 1)  # an odd multiple of m, ≥ 64
        try:
            out = run(np.zeros((1, 3, h, h + 2 * m), np.float32))
        except Exception as exc:  # ORT raises its own error types for shape failures
            seen.append(f"{h}×{h + 2 * m}: {str(exc).splitlines()[0][:80]}")
            continue
        if out.ndim != 4 or out.shape[2:] != (h, h + 2 * m):
            seen.append(f"{h}×{h + 2 * m} → {out.shape}")
            continue
        if out.shape[1] != classes:
            raise UserError(
                f"{source}: the model outputs {out.shape[1]} scores per pixel but --classes "
                f"names {classes}"
            )
        return m
    raise UserError(
        f"{source}: no input size gives per-pixel scores of the same H and W "
        f"(tried {'; '.join(seen[-2:])})"
    )


@dataclass(frozen=True)
class Reach:
    """What the probe found: ``radius`` = the farthest input (px, Chebyshev) any output
    reads; ``needed`` = the smallest context that windows aligned to the factor need
    (an output in the first block of a core may read ``radius`` px back only as far as
    its block start allows); ``side`` = the probe image's side."""

    radius: int
    needed: int
    side: int


def probe(run: Run, m: int, rng: np.random.Generator) -> Reach:
    """For each phase p < m, one row (then one column) i = c + p of a random image (c a
    multiple of m) gets random noise; every output row (column) o that changes at all,
    bit for bit, reads i. A window whose core starts at a multiple of m at or below o,
    and ends at one above it, holds i when its halo is ≥ ⌊o⌋ₘ − i and ≥ i − ⌊o⌋ₘ − m + 1.
    The probe grows until no change reaches its border."""
    side = 128
    while True:
        s = _up(side, m)
        base = rng.standard_normal((1, 3, s, s)).astype(np.float32)
        c = s // 2 // m * m
        radius = needed = 0
        touches = False
        for axis in (2, 3):
            for p0 in range(0, m, PROBES_PER_RUN):
                phases = range(p0, min(m, p0 + PROBES_PER_RUN))
                batch = np.repeat(base, len(phases) + 1, axis=0)
                for n, p in enumerate(phases, 1):
                    line = [n, slice(None), slice(None), slice(None)]
                    line[axis] = c + p
                    batch[tuple(line)] += 3 * rng.standard_normal((3, s)).astype(np.float32)
                out = run(batch)
                for n, p in enumerate(phases, 1):
                    # output rows (axis 2) or columns (axis 3) that moved
                    moved = np.flatnonzero((out[n] != out[0]).any(axis=(0, 4 - axis)))
                    if moved.size == 0:
                        raise UserError("the model's output does not depend on its input")
                    i, block = c + p, moved // m * m
                    touches |= moved[0] == 0 or moved[-1] == s - 1
                    radius = max(radius, i - moved[0], moved[-1] - i)
                    needed = max(needed, (block - i).max(), (i - block - m + 1).max())
        if not touches:
            return Reach(int(radius), int(needed), s)
        if 2 * side > MAX_PROBE:
            raise UserError(
                f"the model's output depends on pixels more than {s // 2} px away (global "
                "pooling, normalisation over the image or attention?); segloop tiles "
                "only models with a local receptive field"
            )
        side *= 2


def halo_for(needed: int, m: int) -> int:
    """The halo for the measured context: + 10 % (at least 4 px), up to a multiple of m."""
    return _up(needed + max(4, math.ceil(needed / 10)), m)


def tiles_match(run: Run, m: int, halo: int, rng: np.random.Generator) -> bool:
    """Four windows (core T = a multiple of m, + halo each side) of a random image equal
    the whole image's run there (to 1e-5 relative; the segment tests check bit for bit)."""
    t = _up(max(halo, 32), m)
    full = rng.standard_normal((1, 3, 2 * t + 2 * halo, 2 * t + 2 * halo)).astype(np.float32)
    whole = run(full)[..., halo : halo + 2 * t, halo : halo + 2 * t]
    wins = np.concatenate(
        [full[..., y : y + t + 2 * halo, x : x + t + 2 * halo] for y in (0, t) for x in (0, t)]
    )
    cores = run(wins)[..., halo : halo + t, halo : halo + t]
    tiled = np.block([[cores[0], cores[1]], [cores[2], cores[3]]])
    scale = float(np.abs(whole).max()) or 1.0
    return bool(np.allclose(tiled, whole[0], rtol=1e-5, atol=1e-5 * scale))


@dataclass(frozen=True)
class Measured:
    multiple: int
    reach: Reach
    halo: int
    seconds: float

    def card_fields(self) -> dict:
        """The card's receptive field, halo and probe entries."""
        return {
            "receptive_radius": self.reach.radius,
            "halo": self.halo,
            "probe": {
                "method": "perturbation",
                "needed": self.reach.needed,
                "side": self.reach.side,
                "seconds": self.seconds,
            },
        }


def measure(run: Run, classes: int, source: Path, seed: int = 0) -> Measured:
    """Downsampling factor, receptive field and halo of a canonical network."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    m = downsampling(run, classes, source)
    while m <= FACTORS[-1]:
        reach = probe(run, m, rng)
        halo = halo_for(reach.needed, m)
        if tiles_match(run, m, halo, rng):
            return Measured(m, reach, halo, round(time.perf_counter() - t0, 3))
        m *= 2
    raise UserError(
        f"{source}: tiles never match the whole-image output (at factors up to "
        f"{FACTORS[-1]}): the model is not shift-equivariant"
    )


def parse_color(text: str) -> list[int]:
    """'#rrggbb' or '#rrggbbaa' → [r, g, b, a]."""
    h = text.strip().lstrip("#")
    if len(h) not in (6, 8) or any(ch not in "0123456789abcdefABCDEF" for ch in h):
        raise UserError(f"--colors: {text!r} is not #rrggbb or #rrggbbaa")
    rgba = [int(h[i : i + 2], 16) for i in range(0, len(h), 2)]
    return rgba + [255] * (4 - len(rgba))


def normalisation(
    channels: str,
    mean: list[float] | None,
    std: list[float] | None,
    scale: float | None,
) -> tuple[list[float], list[float]]:
    """(mean, std) as three R, G, B values on the 0–1 scale (pixel / 255)."""
    if scale is not None:
        if mean is not None or std is not None:
            raise UserError("pass either --scale or --mean/--std, not both")
        if scale <= 0:
            raise UserError("--scale must be positive")
        return [0.0] * 3, [1.0 / (255.0 * scale)] * 3
    if (mean is None) != (std is None):
        raise UserError("--mean and --std go together")
    if mean is None or std is None:
        return [0.0] * 3, [1.0] * 3  # pixel / 255
    n = 1 if channels == "gray" else 3
    for flag, v in (("--mean", mean), ("--std", std)):
        if len(v) not in (1, n):
            raise UserError(f"{flag} needs {n} value(s) for --channels {channels}, got {len(v)}")
    if max(abs(x) for x in mean) > 1 or max(std) > 1:
        raise UserError("--mean and --std are on the 0–1 scale (pixel / 255): e.g. 0.485 for 123.7")
    if min(std) <= 0:
        raise UserError("--std values must be positive")
    return [float(x) for x in mean] * (3 // len(mean)), [float(x) for x in std] * (3 // len(std))


def _config(name: str, *lines: str) -> str:
    return "\n".join(("# written by `segloop model add`", f'name: "{name}"', *lines, ""))


def _shim(cls: str) -> str:
    """A version folder's one-line python-backend entry point."""
    return (
        '"""Triton python backend entry point (see segloop.triton.models)."""\n\n'
        f"from segloop.triton.models import {cls} as TritonPythonModel  # noqa: F401\n"
    )


def _tensor(name: str, dtype: str, dims: str) -> str:
    return f'{{ name: "{name}" data_type: TYPE_{dtype} dims: [ {dims} ] }}'


def _param(key: str, value: object) -> str:
    return f'{{ key: "{key}" value: {{ string_value: "{value}" }} }}'


def _step(model: str, inputs: str, outputs: tuple[str, ...]) -> str:
    maps = ", ".join(f'{{ key: "{o}" value: "{o}" }}' for o in outputs)
    return (
        f'  {{ model_name: "{model}" model_version: -1\n'
        f'    input_map {{ key: "{inputs}" value: "{inputs}" }} output_map [ {maps} ] }}'
    )


def triton_configs(card: dict) -> dict[str, str]:
    """Relative path → text of every Triton file ``model add`` writes for ``card``
    (the configs follow ``segloop_pre``, ``segloop_unet``, ``segloop_post``, ``segloop``)."""
    t = triton_names(card["name"])
    inp, k, halo = card["input"], len(card["classes"]), card["halo"]
    tiles, image = _tensor("TILES", "UINT8", "-1, -1, -1"), _tensor("image", "FP32", "3, -1, -1")
    logits = _tensor("logits", "FP32", f"{k}, -1, -1")
    masks = ", ".join(_tensor(n, "UINT8", "-1, -1") for n in ("LABELS", "CONFIDENCE"))
    cpu = "instance_group [ { kind: KIND_CPU count: 1 } ]"
    net = (
        "max_batch_size: 16",
        f"input [ {image} ]",
        f"output [ {logits} ]",
        "dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 2000 }",
        "version_policy: { latest: { num_versions: 1 } }",
    )
    python = 'backend: "python"'
    return {
        f"{t.net}/config.pbtxt": _config(
            t.net, python, *net, cpu, f"parameters [ {_param('runtime', 'onnx')} ]"
        ),
        f"{t.net}/configs/onnxruntime.pbtxt": _config(
            t.net, 'platform: "onnxruntime_onnx"', *net, "instance_group [ { kind: KIND_GPU } ]"
        ),
        f"{t.pre}/config.pbtxt": _config(
            t.pre,
            python,
            "max_batch_size: 16",
            f"input [ {tiles} ]",
            f"output [ {image} ]",
            cpu,
            "parameters [",
            "  "
            + ",\n  ".join(
                _param(key, value)
                for key, value in (
                    ("mean", inp["mean"]),
                    ("std", inp["std"]),
                    ("halo", halo),
                    ("multiple_of", inp["multiple_of"]),
                )
            ),
            "]",
        ),
        f"{t.post}/config.pbtxt": _config(
            t.post,
            python,
            "max_batch_size: 16",
            f"input [ {logits} ]",
            f"output [ {masks} ]",
            cpu,
            f"parameters [ {_param('halo', halo)} ]",
        ),
        f"{t.ensemble}/config.pbtxt": _config(
            t.ensemble,
            'platform: "ensemble"',
            "max_batch_size: 16",
            f"input [ {tiles} ]",
            f"output [ {masks} ]",
            "ensemble_scheduling { step [",
            _step(t.pre, "TILES", ("image",)) + ",",
            _step(t.net, "image", ("logits",)) + ",",
            _step(t.post, "logits", ("LABELS", "CONFIDENCE")),
            "] }",
        ),
        f"{t.pre}/1/model.py": _shim("PreModel"),
        f"{t.post}/1/model.py": _shim("PostModel"),
        f"{t.ensemble}/1/.gitkeep": "",
    }


def card_markdown(card: dict) -> str:
    """MODEL_CARD.md of an added model."""
    inp, src = card["input"], card["architecture"]
    classes = ", ".join(f"{i} {c}" for i, c in enumerate(card["classes"]))
    mpp = f"{card['mpp']} µm/px" if card["mpp"] else "not stated (pass --mpp)"
    return f"""# Model card: {card["name"]} v{card["version"]}

Added with `segloop model add` from `{src["source"]}` (sha256 {src["source_sha256"][:12]}…),
{card["added"]}. {"Fine-tuned by segloop (below)" if "training" in card else "Not trained here"}.

- **Classes**: {classes}
- **Input**: the network takes {inp["channels"]} (N, {1 if inp["channels"] == "gray" else 3}, H, W);
  `(pixel/255 - mean) / std` with mean {inp["mean"]}, std {inp["std"]} (R, G, B); H, W
  multiples of {inp["multiple_of"]} (its downsampling factor, measured)
- **Output**: {card["output"]["kind"]} (N, {len(card["classes"])}, H, W); the stored graph
  emits logits (log of probabilities)
- **Pixel size**: {mpp}
- **Receptive-field radius**: {card["receptive_radius"]} px; windows aligned to the factor
  need {card["probe"]["needed"]} px of context (perturbation probe through ONNX Runtime,
  {card["probe"]["side"]}² image, {card["probe"]["seconds"]} s); **halo** {card["halo"]} px
  (that + 10 %, ≥ 4 px, rounded up to the factor)

The stored `model.onnx` is the network behind a fixed contract: input `image`
(N, 3, H, W) float32 normalised RGB → output `logits` (N, K, H, W) float32. The same
numbers travel in its `metadata_props`.
{lineage(card["training"]) if "training" in card else ""}"""


def add_model(
    source: Path,
    name: str,
    classes: list[str],
    colors: list[list[int]] | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    scale: float | None = None,
    channels: str | None = None,
    mpp: float | None = None,
    output: str = "logits",
    repo: Path | None = None,
    threads: int | None = None,
) -> Path:
    """Validate, measure and write ``source`` as the next version of ``name``; returns
    the written model.onnx (see the module docstring)."""
    repo = repository(repo)
    if (
        not NAME_RE.fullmatch(name)
        or name in RESERVED
        or name.endswith(("_pre", "_post", "_tiles"))
    ):
        raise UserError(
            f"--name {name!r}: use letters, digits, _ . - (not {', '.join(sorted(RESERVED))}, "
            "nor ending in _pre, _post or _tiles)"
        )
    if len(classes) < 2 or len(classes) > 256 or len(set(classes)) != len(classes):
        raise UserError("--classes needs 2 to 256 distinct names, e.g. background,nucleus")
    if output not in OUTPUTS:
        raise UserError(f"--output {output!r}: choose logits or probabilities")
    if mpp is not None and not mpp > 0:
        raise UserError("--mpp must be a positive number of µm per pixel")
    colors = colors or [list(PALETTE[i % len(PALETTE)]) for i in range(len(classes))]
    if len(colors) != len(classes):
        raise UserError(f"--colors gives {len(colors)} colours for {len(classes)} classes")
    try:
        raw = source.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {source}: {exc.strerror}") from exc
    try:
        proto = onnx.load_from_string(raw)
    except Exception as exc:  # protobuf's DecodeError, onnx's own errors
        raise UserError(f"{source}: not a readable ONNX model ({exc})") from exc
    sig = signature(proto, source)
    if channels is None:
        channels = "gray" if sig.in_channels == 1 else "RGB"
    if channels not in CHANNELS:
        raise UserError(f"--channels {channels!r}: choose RGB, BGR or gray")
    if sig.in_channels not in (None, 1 if channels == "gray" else 3):
        raise UserError(
            f"{source}: the model takes {sig.in_channels} input channels; --channels "
            f"{channels} gives {1 if channels == 'gray' else 3}"
        )
    if sig.out_channels not in (None, len(classes)):
        raise UserError(
            f"{source}: the model outputs {sig.out_channels} scores per pixel but "
            f"--classes names {len(classes)}"
        )
    mean3, std3 = normalisation(channels, mean, std, scale)
    wrapped = canonical(proto, sig, channels, output)
    run = session(wrapped, threads or len(os.sched_getaffinity(0)))
    m = measure(run, len(classes), source)
    folder = repo / name
    version = (versions(folder) or [0])[-1] + 1
    card = {
        "name": name,
        "version": version,
        "parent_version": None,
        "classes": list(classes),
        "colors": colors,
        "input": {
            "layout": "NCHW",
            "channels": channels,
            "dtype": "float32",
            "normalise": "(pixel/255 - mean) / std",
            "mean": mean3,
            "std": std3,
            "multiple_of": m.multiple,
        },
        "output": {"layout": "NCHW", "dtype": "float32", "kind": output},
        "mpp": mpp,
        "architecture": {
            "type": "onnx",
            "source": source.name,
            "source_sha256": hashlib.sha256(raw).hexdigest(),
            "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        },
        **m.card_fields(),
        "added": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    write_card(wrapped, card)
    repo.mkdir(parents=True, exist_ok=True)
    for rel, text in triton_configs(card).items():
        path = repo / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    tmp = folder / f".v{version}.tmp"  # the version appears whole (Triton may be polling)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    onnx.save(wrapped, str(tmp / "model.onnx"))
    (tmp / "model.py").write_text(_shim("UnetModel"))
    (tmp / "MODEL_CARD.md").write_text(card_markdown(card))
    os.replace(tmp, folder / str(version))
    return folder / str(version) / "model.onnx"

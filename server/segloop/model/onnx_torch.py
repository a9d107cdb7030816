"""An ONNX graph run by torch operators, so that any model ``segloop model add`` wrote can
be fine-tuned: ``OnnxModule(proto)`` is an ``nn.Module`` whose parameters are the
graph's weights (the float initializers of the network's Conv, ConvTranspose, Gemm,
MatMul, PRelu and normalisation nodes, and per-channel Add/Mul tensors) and whose
``forward`` evaluates the nodes in order with differentiable torch operators.
``write_back(module)`` puts the trained weights into a copy of the graph: the new
version is the same graph, every node and attribute kept, so the halo measured for it
stays the network's.

Normalisation layers run as at inference (BatchNormalization with its stored running
statistics, frozen; Dropout is the identity): a fine-tune on a few corrected tiles
updates their scale and bias, never their statistics.

Covers the operators that segmentation networks exported by torch (MONAI included) use
(``OPS``); a graph with another operator is refused by name before training. The module
is checked against ONNX Runtime on a probe image (``check_parity``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

from segloop.errors import UserError

#: node inputs (by position) that hold trainable weights, per operator (and see
#: ``_weight_slots``)
WEIGHTS = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (1, 2),
    "MatMul": (1,),
    "PRelu": (1,),
    "BatchNormalization": (1, 2),  # scale, bias; the running mean and variance stay
    "InstanceNormalization": (1, 2),
    "LayerNormalization": (1, 2),
}


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _ints(t: torch.Tensor) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _pads(x: torch.Tensor, pads: list[int], value: float = 0.0) -> tuple[torch.Tensor, list[int]]:
    """ONNX spatial pads (begin…, end…) → symmetric ones for torch, padding ``x``
    itself where begin ≠ end."""
    n = len(pads) // 2
    begin, end = pads[:n], pads[n:]
    if begin == end:
        return x, begin
    flat: list[int] = []
    for b, e in zip(reversed(begin), reversed(end), strict=True):
        flat += [b, e]
    return F.pad(x, flat, value=value), [0] * n


def _conv(x, w, b=None, *, transpose: bool = False, **a) -> torch.Tensor:
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID"):
        raise UserError(f"Conv auto_pad={a['auto_pad']!r} is not supported for fine-tuning")
    k = w.dim() - 2
    strides, dil = a.get("strides", [1] * k), a.get("dilations", [1] * k)
    group, pads = a.get("group", 1), a.get("pads", [0] * 2 * k)
    if transpose:
        n = len(pads) // 2
        if pads[:n] != pads[n:]:
            raise UserError("ConvTranspose with asymmetric pads is not supported for fine-tuning")
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[k - 1]
        out_pad = a.get("output_padding", [0] * k)
        return fn(x, w, b, strides, pads[:n], out_pad, group, dil)
    x, sym = _pads(x, pads)
    return (F.conv1d, F.conv2d, F.conv3d)[k - 1](x, w, b, strides, sym, dil, group)


def _pool(x, *, kind: str, **a) -> torch.Tensor:
    ks = a["kernel_shape"]
    k = len(ks)
    strides, pads = a.get("strides", [1] * k), a.get("pads", [0] * 2 * k)
    ceil = bool(a.get("ceil_mode", 0))
    if kind == "max":
        x, sym = _pads(x, pads, -math.inf)
        fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[k - 1]
        return fn(x, ks, strides, sym, a.get("dilations", [1] * k), ceil)
    include = bool(a.get("count_include_pad", 0))
    x, sym = _pads(x, pads) if include else (x, pads[:k])
    if pads[:k] != pads[k:] and not include:
        raise UserError("AveragePool with asymmetric pads is not supported for fine-tuning")
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[k - 1]
    return fn(x, ks, strides, sym, ceil, include)


def _resize(x, roi=None, scales=None, sizes=None, **a) -> torch.Tensor:
    mode = a.get("mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    ctm = a.get("coordinate_transformation_mode", b"half_pixel")
    ctm = ctm.decode() if isinstance(ctm, bytes) else ctm
    if sizes is not None and sizes.numel():
        size = _ints(sizes)[2:]
        kw: dict = {"size": size}
    else:
        kw = {"scale_factor": [float(s) for s in scales.reshape(-1).tolist()[2:]]}
    if mode == "nearest":
        nearest = a.get("nearest_mode", b"round_prefer_floor")
        nearest = nearest.decode() if isinstance(nearest, bytes) else nearest
        if (ctm, nearest) == ("asymmetric", "floor"):
            return F.interpolate(x, mode="nearest", **kw)
        if ctm in ("half_pixel", "pytorch_half_pixel") and nearest == "round_prefer_floor":
            return F.interpolate(x, mode="nearest-exact", **kw)
    elif mode == "linear" and ctm in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        spatial = ("linear", "bilinear", "trilinear")[x.dim() - 3]
        return F.interpolate(x, mode=spatial, align_corners=ctm == "align_corners", **kw)
    raise UserError(f"Resize mode={mode} coordinate_transformation_mode={ctm} is not supported")


def _slice(x, starts, ends, axes=None, steps=None) -> torch.Tensor:
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps, strict=True):
        d = _axis(ax, x.dim())
        if st < 0:  # torch slices forwards only: flip the axis, mirror the bounds
            n = x.shape[d]
            s, e = (min(max(v + n if v < 0 else v, -1), n - 1) for v in (s, e))
            x, s, e, st = x.flip(d), n - 1 - s, n - 1 - e, -st
        index[d] = slice(s, e, st)
    return x[tuple(index)]


def _gather(x, idx, axis: int = 0) -> torch.Tensor:
    axis = _axis(axis, x.dim())
    idx = torch.where(idx < 0, idx + x.shape[axis], idx).long()
    if idx.dim() == 0:
        return x.select(axis, int(idx))
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :])


def _reshape(x, shape) -> torch.Tensor:
    dims = [x.shape[i] if d == 0 else d for i, d in enumerate(_ints(shape))]
    return x.reshape(dims)


def _axes(node_axes, given) -> list[int] | None:
    """Axes from an input tensor (newer opsets) or the ``axes`` attribute (older ones,
    which arrives by keyword as ``given`` or in ``node_axes``)."""
    value = given if given is not None else node_axes
    if value is None:
        return None
    return _ints(value) if isinstance(value, torch.Tensor) else [int(v) for v in value]


def _reduce(fn: Callable) -> Callable:
    def op(x, axes=None, **a):
        axes = _axes(a.get("axes"), axes)
        keep = bool(a.get("keepdims", 1))
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, dim=axes, keepdim=keep)

    return op


def _unsqueeze(x, axes=None, **a) -> torch.Tensor:
    given = _axes(a.get("axes"), axes) or []
    for ax in sorted(_axis(v, x.dim() + len(given)) for v in given):
        x = x.unsqueeze(ax)
    return x


def _squeeze(x, axes=None, **a) -> torch.Tensor:
    axes = _axes(a.get("axes"), axes)
    if axes is None:
        return x.squeeze()
    for ax in sorted((_axis(v, x.dim()) for v in axes), reverse=True):
        x = x.squeeze(ax)
    return x


def _softmax(fn: Callable) -> Callable:
    def op(x, axis: int = -1, **a):
        return fn(x, dim=axis)

    return op


def _pad(x, pads, value=None, axes=None, mode=b"constant", **a) -> torch.Tensor:
    mode = mode.decode() if isinstance(mode, bytes) else mode
    p = _ints(pads)
    n = len(p) // 2
    rank_axes = _ints(axes) if axes is not None else list(range(x.dim()))
    flat: list[int] = [0, 0] * x.dim()
    for k, ax in enumerate(rank_axes):
        ax = _axis(ax, x.dim())
        flat[2 * (x.dim() - 1 - ax)] = p[k]
        flat[2 * (x.dim() - 1 - ax) + 1] = p[n + k]
    while len(flat) > 2 and flat[-2:] == [0, 0]:
        flat = flat[:-2]
    if mode == "constant":
        return F.pad(x, flat, value=float(value) if value is not None and value.numel() else 0.0)
    return F.pad(x, flat, mode={"reflect": "reflect", "edge": "replicate"}[mode])


def _clip(x, lo=None, hi=None, **a) -> torch.Tensor:
    lo = a.get("min", lo.item() if lo is not None and lo.numel() else None)
    hi = a.get("max", hi.item() if hi is not None and hi.numel() else None)
    return torch.clamp(x, lo, hi)


def _gemm(a, b, c=None, alpha=1.0, beta=1.0, transA=0, transB=0) -> torch.Tensor:
    a, b = (a.t() if transA else a), (b.t() if transB else b)
    out = alpha * (a @ b)
    return out if c is None else out + beta * c


DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}

#: operator → f(*inputs, **attributes)
OPS: dict[str, Callable] = {
    "Identity": lambda x: x,
    "Dropout": lambda x, *_, **a: x,
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Div": lambda a, b: a / b if a.is_floating_point() else torch.div(a, b, rounding_mode="trunc"),
    "Pow": torch.pow,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Sqrt": torch.sqrt,
    "Exp": torch.exp,
    "Log": torch.log,
    "Erf": torch.erf,
    "Max": lambda *xs: xs[0] if len(xs) == 1 else torch.maximum(xs[0], OPS["Max"](*xs[1:])),
    "Min": lambda *xs: xs[0] if len(xs) == 1 else torch.minimum(xs[0], OPS["Min"](*xs[1:])),
    "Relu": torch.relu,
    "LeakyRelu": lambda x, alpha=0.01: F.leaky_relu(x, alpha),
    "Elu": lambda x, alpha=1.0: F.elu(x, alpha),
    "Selu": lambda x, **a: F.selu(x),
    "PRelu": lambda x, slope: torch.where(x >= 0, x, x * slope),
    "Sigmoid": torch.sigmoid,
    "HardSigmoid": lambda x, alpha=0.2, beta=0.5: torch.clamp(alpha * x + beta, 0, 1),
    "HardSwish": F.hardswish,
    "Tanh": torch.tanh,
    "Softplus": F.softplus,
    "Clip": _clip,
    "Softmax": _softmax(torch.softmax),
    "LogSoftmax": _softmax(torch.log_softmax),
    "Conv": _conv,
    "ConvTranspose": lambda x, w, b=None, **a: _conv(x, w, b, transpose=True, **a),
    "BatchNormalization": lambda x, s, b, mean, var, epsilon=1e-5, **a: F.batch_norm(
        x, mean, var, s, b, False, 0.0, epsilon
    ),
    "InstanceNormalization": lambda x, s, b, epsilon=1e-5: F.instance_norm(
        x, weight=s, bias=b, eps=epsilon
    ),
    "LayerNormalization": lambda x, s, b=None, axis=-1, epsilon=1e-5, **a: F.layer_norm(
        x, x.shape[_axis(axis, x.dim()) :], s, b, epsilon
    ),
    "MaxPool": lambda x, **a: _pool(x, kind="max", **a),
    "AveragePool": lambda x, **a: _pool(x, kind="avg", **a),
    "GlobalAveragePool": lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "GlobalMaxPool": lambda x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True),
    "ReduceMean": _reduce(torch.mean),
    "ReduceSum": _reduce(torch.sum),
    "ReduceMax": _reduce(torch.amax),
    "Resize": _resize,
    "Upsample": lambda x, scales, mode=b"nearest": _resize(
        x,
        scales=scales,
        mode=mode,
        coordinate_transformation_mode=b"asymmetric",
        nearest_mode=b"floor",
    ),
    "Concat": lambda *xs, axis: torch.cat(xs, axis),
    "Slice": _slice,
    "Gather": _gather,
    "Reshape": lambda x, shape, **a: _reshape(x, shape),
    "Flatten": lambda x, axis=1: x.reshape(math.prod(x.shape[:axis]), -1),
    "Transpose": lambda x, perm=None: x.permute(perm or list(reversed(range(x.dim())))),
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Shape": lambda x, start=0, end=None: torch.tensor(x.shape[start:end], dtype=torch.int64),
    "ConstantOfShape": lambda shape, value=None: torch.full(
        _ints(shape),
        float(numpy_helper.to_array(value).reshape(-1)[0]) if value is not None else 0.0,
        dtype=DTYPES[value.data_type] if value is not None else torch.float32,
    ),
    "Cast": lambda x, to, **a: x.to(DTYPES[to]),
    "Pad": _pad,
    "MatMul": torch.matmul,
    "Gemm": _gemm,
    "Where": torch.where,
    "Equal": torch.eq,
}


def _weight_slots(node: onnx.NodeProto, inits: dict) -> list[int]:
    """Input positions of ``node`` that read weights: ``WEIGHTS``, and the per-channel
    tensors (≥ 2 values) an Add or Mul reads from an initializer: the affine scale and
    bias of a normalisation exported as its parts (GroupNorm, LayerScale). Scalars stay
    constants (GELU's √2, a residual's 0.5), and so does whatever a Sub or Div reads
    (an in-graph input normalisation)."""
    slots = [i for i in WEIGHTS.get(node.op_type, ()) if i < len(node.input)]
    if node.op_type in ("Add", "Mul"):
        slots = [
            i for i, name in enumerate(node.input)
            if name in inits and math.prod(inits[name].dims) >= 2
        ]  # fmt: skip
    return [i for i in slots if node.input[i] in inits]


def _unshared(proto: onnx.ModelProto, prefix: str) -> tuple[onnx.ModelProto, set[str]]:
    """A copy of ``proto`` where every weight slot (``_weight_slots``) that reads an
    initializer named with ``prefix`` (directly or through Identity nodes) reads one of
    its own (exporters merge equal tensors: a zero bias and a zero running mean may be
    one), and the names of those weights."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    # exporters pass a merged tensor on through Identity nodes: see through them
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}
    for node in graph.node:
        for i, name in enumerate(node.input):
            seen = name
            while seen in alias and seen not in inits:
                seen = alias[seen]
            if seen != name and seen in inits:
                node.input[i] = seen
                uses[seen] = uses.get(seen, 0) + 1
    trainable: set[str] = set()
    for node in graph.node:
        for i in _weight_slots(node, inits):
            name = node.input[i]
            if not name.startswith(prefix) or inits[name].data_type != onnx.TensorProto.FLOAT:
                continue
            if uses[name] > 1:  # a copy for this slot alone
                uses[name] -= 1
                own = f"{name}__{node.name or node.output[0]}_{i}"
                graph.initializer.append(
                    numpy_helper.from_array(numpy_helper.to_array(inits[name]), own)
                )
                node.input[i] = name = own
            trainable.add(name)
    return out, trainable


def _constant(attrs: dict) -> torch.Tensor:
    if "value" in attrs:
        return torch.from_numpy(numpy_helper.to_array(attrs["value"]).copy())
    for key, dtype in (("value_float", torch.float32), ("value_floats", torch.float32),
                       ("value_int", torch.int64), ("value_ints", torch.int64)):  # fmt: skip
        if key in attrs:
            return torch.tensor(attrs[key], dtype=dtype)
    raise UserError(f"Constant with {', '.join(attrs)} is not supported for fine-tuning")


class OnnxModule(nn.Module):
    """``proto``'s graph as a torch module: (N, C, H, W) float32 → its first output.
    The weight initializers (``WEIGHTS``) named with ``prefix`` are parameters
    (``model add``'s wrapper around the network stays fixed), every other one a buffer;
    ``names[k]`` is the initializer behind parameter/buffer ``k``."""

    def __init__(self, proto: onnx.ModelProto, prefix: str = "") -> None:
        super().__init__()
        if any(o.domain not in ("", "ai.onnx") for o in proto.opset_import):
            raise UserError("the model uses operators outside the standard ONNX domain")
        unknown = sorted({n.op_type for n in proto.graph.node} - set(OPS) - {"Constant"})
        if unknown:
            raise UserError(
                f"fine-tuning runs ONNX graphs by torch operators; this one uses "
                f"{', '.join(unknown)}, which segloop does not cover yet"
            )
        self.proto, trainable = _unshared(proto, prefix)
        graph = self.proto.graph
        self.names: dict[str, str] = {}
        self.params = nn.ParameterDict()
        for k, t in enumerate(graph.initializer):
            key = f"w{k}"
            value = torch.from_numpy(numpy_helper.to_array(t).copy())
            self.names[key] = t.name
            if t.name in trainable:
                self.params[key] = nn.Parameter(value)
            else:
                self.register_buffer(key, value, persistent=False)
        self._by_name = {name: key for key, name in self.names.items()}
        self.nodes = [(n.op_type, list(n.input), list(n.output), _attrs(n)) for n in graph.node]
        self.input = graph.input[0].name
        self.output = graph.output[0].name

    def tensor(self, name: str) -> torch.Tensor:
        key = self._by_name[name]
        return self.params[key] if key in self.params else getattr(self, key)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, torch.Tensor | None] = {self.input: x, "": None}
        for name in self._by_name:
            env[name] = self.tensor(name)
        for op, ins, outs, attrs in self.nodes:
            if op == "Constant":
                env[outs[0]] = _constant(attrs)
                continue
            args = [env[i] for i in ins]
            while args and args[-1] is None:  # trailing optional inputs left out
                args.pop()
            out = OPS[op](*args, **attrs)
            env[outs[0]] = out
        return env[self.output]


def write_back(module: OnnxModule) -> onnx.ModelProto:
    """``module``'s graph with its trained parameters as the initializers."""
    out = onnx.ModelProto()
    out.CopyFrom(module.proto)
    trained = {module.names[k]: p.detach().cpu().numpy() for k, p in module.params.items()}
    for t in out.graph.initializer:
        if t.name in trained:
            t.CopyFrom(numpy_helper.from_array(trained[t.name].astype(np.float32), t.name))
    return out


def check_parity(proto: onnx.ModelProto, module: OnnxModule, side: int, seed: int = 0) -> float:
    """Largest |torch − ONNX Runtime| on a random (1, 3, side, side) input, relative to
    the largest output; refuses the graph when it is over 1e-3 (an operator read
    differently here than by ONNX Runtime)."""
    import onnxruntime as ort

    x = np.random.default_rng(seed).normal(0, 1, (1, 3, side, side)).astype(np.float32)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    err = float(np.abs(got - want).max() / max(1e-6, float(np.abs(want).max())))
    if got.shape != want.shape or not err <= 1e-3:
        raise UserError(
            f"fine-tuning: torch's reading of the graph differs from ONNX Runtime's "
            f"(relative error {err:.2g}); this graph cannot be fine-tuned here"
        )
    return err

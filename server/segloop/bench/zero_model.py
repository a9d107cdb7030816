"""A zero-cost stand-in for the model: the host pipeline's ceiling.

``identity_model`` writes an ONNX file whose graph passes its input through as the
logits (ONNX ``Identity`` when the card has 3 classes, else a 1×1 convolution copying
input channel k mod 3 to logit k) and whose ``metadata_props`` are the real model's card
(halo, normalisation, classes). ``segment --model`` then runs every stage exactly as
with the real model (same windows, batches, pre, post, writes) while the model itself
costs ~1 ns per pixel, so the measured rate is what the pipeline around the model can
feed an accelerator: ``host_ceiling_mpx_s``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def identity_model(real: Path, out: Path) -> Path:
    """Write the identity stand-in for the ONNX model ``real`` to ``out``; returns ``out``."""
    proto = onnx.load(str(real), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    classes = len(json.loads(meta["classes"]))
    if classes == 3:
        nodes, init = [helper.make_node("Identity", ["input"], ["logits"])], []
    else:
        weight = np.zeros((classes, 3, 1, 1), np.float32)
        for k in range(classes):
            weight[k, k % 3, 0, 0] = 1.0
        nodes = [helper.make_node("Conv", ["input", "w"], ["logits"], kernel_shape=[1, 1])]
        init = [numpy_helper.from_array(weight, "w")]
    graph = helper.make_graph(
        nodes,
        "identity",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", classes, "h", "w"])],
        init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = proto.ir_version
    card = dict(meta, name=json.dumps("zero_cost_identity"))
    helper.set_model_props(model, card)
    onnx.checker.check_model(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    return out

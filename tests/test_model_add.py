"""`segloop model add`: networks of other architectures, never trained here (random seeded
weights, exported to ONNX without a card), measured, written to a repository and
segmented seam-free: tiled == whole image == one ONNX Runtime run on the reflect-padded
image, bit for bit; through Triton too; and a too-small halo is caught."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import zarr
from onnx import helper, numpy_helper
from PIL import Image
from torch import nn

from segloop.errors import UserError
from segloop.kernels.post import windows_into
from segloop.kernels.pre import Normalisation, normalise_into
from segloop.model.add import LUMINANCE, NET_PREFIX, add_model
from segloop.model.card import read_card, write_card
from segloop.model.onnx_torch import OnnxModule, check_parity, write_back
from segloop.model.registry import list_models, resolve_model
from segloop.pipeline.segment import SegmentOptions, segment
from tests.conftest import assert_user_error, run_cli

AXES = {0: "batch", 2: "height", 3: "width"}


class Strided(nn.Module):
    """Strided (÷4) and dilated convolutions, nearest upsampling, a skip from the input."""

    def __init__(self, cin: int, k: int) -> None:
        super().__init__()
        self.down = nn.Sequential(
            nn.Conv2d(cin, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=2, dilation=2),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=3, dilation=3),
            nn.ReLU(),
            nn.Upsample(scale_factor=4, mode="nearest"),
        )
        self.head = nn.Conv2d(16 + cin, k, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.down(x), x], 1))


class Dilated(nn.Module):
    """Gray in, no downsampling: a stack of dilated convolutions (radius 1 + 2 + 4 + 1)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for d in (1, 2, 4):
            layers += [nn.Conv2d(cin, 8, 3, padding=d, dilation=d), nn.Tanh()]
            cin = 8
        self.net = nn.Sequential(*layers, nn.Conv2d(8, k, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GlobalMean(nn.Module):
    """Not local: every output pixel adds the image's mean (like image-wide normalisation)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x) + x.mean(dim=(2, 3), keepdim=True)[:, :2]


class Softmaxed(nn.Module):
    """A network that outputs probabilities."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)


def _export(model: nn.Module, cin: int, path: Path) -> Path:
    torch.manual_seed(0)
    model.eval()
    torch.onnx.export(
        model,
        (torch.zeros(1, cin, 64, 64),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["pixels"],
        output_names=["scores"],
        dynamic_axes={"pixels": AXES, "scores": AXES},
    )
    return path


def _monai_unet() -> nn.Module:
    from monai.networks.nets import UNet

    torch.manual_seed(1)
    return UNet(2, 3, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1, norm="batch")


#: name → (network factory, input channels, `model add` options)
MODELS = {
    "strided5": (
        lambda: Strided(3, 5),
        3,
        {
            "classes": ["bg", "a", "b", "c", "d"],
            "channels": "BGR",
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "mpp": 0.25,
        },
    ),
    "monai2": (
        lambda: Softmaxed(_monai_unet()),
        3,
        {"classes": ["bg", "fg"], "scale": 1 / 255, "output": "probabilities", "mpp": 1.0},
    ),
    "gray4": (
        lambda: Dilated(4),
        1,
        {"classes": ["bg", "x", "y", "z"], "mean": [0.5], "std": [0.25], "mpp": 0.5},
    ),
}


@pytest.fixture(scope="module")
def added(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Each network exported (no card) and added: name → (source onnx, added model.onnx)."""
    d = tmp_path_factory.mktemp("model_add")
    out = {}
    for name, (factory, cin, options) in MODELS.items():
        torch.manual_seed(0)
        source = _export(factory(), cin, d / f"{name}.onnx")
        out[name] = source, add_model(source, name, repo=d / "repository", **options)
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """A 420×500 RGB and a 300×260 gray PNG (smooth noise, odd sizes)."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(7)
    coarse = rng.integers(0, 256, (60, 70, 3), dtype=np.uint8)
    rgb = np.asarray(Image.fromarray(coarse).resize((500, 420), Image.BILINEAR))
    rgb = np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)
    gray = rgb[:300, :260, 1].copy()
    Image.fromarray(rgb).save(d / "rgb.png")
    Image.fromarray(gray).save(d / "gray.png")
    return {"rgb": d / "rgb.png", "gray": d / "gray.png"}


def _image_for(name: str, images: dict[str, Path]) -> Path:
    return images["gray" if name == "gray4" else "rgb"]


def whole_image(model: Path, image: Path) -> tuple[np.ndarray, np.ndarray]:
    """One ONNX Runtime run of ``model`` on the whole image, reflect padded by the halo
    (np.pad, mode "reflect") and up to the downsampling factor; labels, confidence (H, W)
    uint8 through the same pre/post kernels as the pipeline."""
    card = read_card(model)
    halo, m = card["halo"], card["input"]["multiple_of"]
    img = np.asarray(Image.open(image))
    img = img[..., None] if img.ndim == 2 else img
    h, w = img.shape[:2]
    padded = np.pad(
        img,
        ((halo, halo + -h % m), (halo, halo + -w % m), (0, 0)),
        mode="reflect",
    )
    norm = Normalisation(
        tuple(card["input"]["mean"]),
        tuple(card["input"]["std"]),
        (0, 0, 0) if img.shape[2] == 1 else (0, 1, 2),
    )
    x = np.empty((1, 3, *padded.shape[:2]), np.float32)
    rows, cols = (np.arange(n, dtype=np.intp) for n in padded.shape[:2])
    normalise_into(padded, rows, cols, norm, x[0])
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"image": x})[0]
    labels, conf = np.empty((h, w), np.uint8), np.empty((h, w), np.uint8)
    windows_into(logits, halo, np.zeros((1, 2), np.intp), np.array([[h, w]], np.intp), labels, conf)
    return labels, conf


def _segment(model: Path | str, image: Path, out: Path, **opts) -> tuple[np.ndarray, np.ndarray]:
    segment(image, out, SegmentOptions(model=model, **opts))
    root = zarr.open_group(out, mode="r")
    return root["labels/segmentation/0"][...], root["confidence/0"][...]


def test_model_add_measures_the_receptive_field_and_sets_the_halo(added):
    """Known radii: Strided 23 px (1 + 4 + 2 + 12 + 3 + 1), Dilated 8 px (1 + 2 + 4 + 1),
    found exactly; the context aligned windows need is ≤ the radius; halo = that + 10 %
    (≥ 4 px), rounded up to the factor."""
    true = {"strided5": 23, "gray4": 8}
    for name, (_, model) in added.items():
        card = read_card(model)
        m, radius, halo = card["input"]["multiple_of"], card["receptive_radius"], card["halo"]
        needed = card["probe"]["needed"]
        assert m == {"strided5": 4, "monai2": 4, "gray4": 1}[name], name
        assert radius == true.get(name, radius) and 0 < needed <= radius, (name, card)
        margin = max(4, -(-needed // 10))
        assert halo % m == 0 and needed + margin <= halo < needed + margin + m, (name, card)
        assert card["classes"] == MODELS[name][2]["classes"]
        assert len(card["colors"]) == len(card["classes"])
    card = read_card(added["gray4"][1])
    assert card["input"]["channels"] == "gray" and card["mpp"] == 0.5
    assert read_card(added["monai2"][1])["output"]["kind"] == "probabilities"
    assert read_card(added["strided5"][1])["input"]["channels"] == "BGR"


def test_the_wrapped_graph_is_the_network(added):
    """The stored graph (normalised RGB → logits) computes the user's network: BGR swapped,
    gray = luminance, probabilities = exp(logits)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 48, 48)).astype(np.float32)
    for name, (source, model) in added.items():
        net = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
        ours = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        got = ours.run(None, {"image": x})[0]
        if name == "gray4":
            feed = np.tensordot(np.array(LUMINANCE, np.float32), x, axes=([0], [1]))[:, None]
        else:
            feed = x[:, ::-1] if name == "strided5" else x
        want = net.run(None, {"pixels": np.ascontiguousarray(feed)})[0]
        if name == "monai2":
            got = np.exp(got)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("name", list(MODELS))
def test_tiled_equals_whole_image_bit_for_bit(added, images, tmp_path, name):
    """--tile 128 --window 128 (many windows) and --tile 1024 (one window) agree exactly,
    and equal one ORT run on the reflect-padded image."""
    model, image = added[name][1], _image_for(name, images)
    small = _segment(model, image, tmp_path / "t128.zarr", tile=128, window=128)
    big = _segment(model, image, tmp_path / "t1024.zarr", tile=1024)
    whole = whole_image(model, image)
    for got in (small, big):
        np.testing.assert_array_equal(got[0], whole[0], err_msg=f"{name} labels")
        np.testing.assert_array_equal(got[1], whole[1], err_msg=f"{name} confidence")
    assert len(np.unique(whole[0])) > 1, "a constant answer would prove nothing"
    meta = zarr.open_group(tmp_path / "t128.zarr" / "labels/segmentation", mode="r").attrs
    colors = meta["ome"]["image-label"]["colors"]
    assert len(colors) == len(MODELS[name][2]["classes"])


def test_a_too_small_halo_breaks_exactness(added, images, tmp_path):
    """The same comparison with the card's halo overridden to one factor step below the
    measured need (20 px for Strided's 23): the windows' seams show, so the exactness
    test above can fail, and the measured need is tight."""
    proto = onnx.load(str(added["strided5"][1]))
    card = {p.key: json.loads(p.value) for p in proto.metadata_props}
    m = card["input"]["multiple_of"]
    short_halo = -(-card["probe"]["needed"] // m) * m - m
    assert short_halo == 20
    write_card(proto, {**card, "halo": short_halo})
    short = tmp_path / "short.onnx"
    onnx.save(proto, str(short))
    image = images["rgb"]
    _, conf = _segment(short, image, tmp_path / "short.zarr", tile=128, window=128)
    _, want_conf = whole_image(added["strided5"][1], image)
    assert not np.array_equal(conf, want_conf)


def test_names_resolve_and_list(added, images, tmp_path, monkeypatch):
    """`--model NAME` is the newest version in the repository; `models` lists them; a
    second `model add` under the same name is version 2."""
    repo = added["gray4"][1].parents[2]
    monkeypatch.setenv("SEGLOOP_MODEL_REPOSITORY", str(repo))
    assert resolve_model("gray4") == added["gray4"][1]
    source = added["gray4"][0]
    v2 = add_model(source, "gray4", ["bg", "x", "y", "z"], mean=[0.5], std=[0.25], mpp=0.5)
    assert v2 == repo / "gray4" / "2" / "model.onnx" and resolve_model("gray4") == v2
    rows = {r["name"]: r for r in list_models()}
    assert set(rows) >= set(MODELS)
    assert rows["gray4"]["versions"] == [1, 2] and rows["gray4"]["channels"] == "gray"
    assert rows["monai2"]["classes"] == ["bg", "fg"] and rows["strided5"]["halo"] == 28
    labels, _ = _segment("gray4", images["gray"], tmp_path / "byname.zarr", tile=128)
    np.testing.assert_array_equal(labels, whole_image(v2, images["gray"])[0])


def test_bad_models_are_refused_with_one_line(added, images, tmp_path):
    """A card-less ONNX names `segloop model add`; a class count or channel option that
    does not match the network, and a network that is not local, are refused before
    anything is written."""
    source = added["strided5"][0]
    proc = run_cli("segment", images["rgb"], "-o", tmp_path / "x.zarr", "--model", source)
    assert_user_error(proc, "segloop model add")
    assert not (tmp_path / "x.zarr").exists()
    repo = tmp_path / "repository"
    with pytest.raises(Exception, match="outputs 5 scores per pixel but --classes names 3"):
        add_model(source, "wrong", ["a", "b", "c"], repo=repo)
    with pytest.raises(Exception, match="takes 3 input channels"):
        add_model(source, "wrong", list("abcde"), channels="gray", repo=repo)
    glob = _export(GlobalMean(), 3, tmp_path / "global.onnx")
    with pytest.raises(Exception, match="more than 1024 px away"):
        add_model(glob, "global", ["a", "b"], repo=repo)
    assert not repo.exists()


def test_cli_model_add_and_models(added, tmp_path):
    """The command line: `model add` writes version 1 and says its halo; `models --json`
    lists it; a bad option is one line, nothing written."""
    repo = tmp_path / "repository"
    source = added["gray4"][0]
    args = ["model", "add", source, "--name", "g", "--classes", "a,b,c,d", "--repository", repo]
    bad = run_cli(*args, "--mean", "127", "--std", "64")
    assert_user_error(bad, "0–1 scale")
    assert not repo.exists()
    proc = run_cli(*args, "--colors", "#000000,#ff0000,#00ff00,#0000ff80", "--json")
    assert proc.returncode == 0, proc.stderr
    done = json.loads(proc.stdout.splitlines()[-1])
    assert done["halo"] == read_card(added["gray4"][1])["halo"] and done["version"] == 1
    assert read_card(repo / "g/1/model.onnx")["colors"][3] == [0, 0, 255, 128]
    rows = [
        json.loads(line)
        for line in run_cli("models", "--repository", repo, "--json").stdout.splitlines()
    ]
    assert [(r["name"], r["versions"], r["channels"]) for r in rows] == [("g", [1], "gray")]


def test_through_triton_equals_the_whole_image_run(added, images, tmp_path):
    """The added model's ensemble (NAME_tiles: pre → network → post) on a real
    tritonserver gives the same labels and confidence as the whole-image run."""
    pytest.importorskip("tritonclient.grpc.aio")
    from tests.test_triton import Server  # skips the test where no tritonserver exists

    model = added["strided5"][1]
    repo = tmp_path / "repository"
    for part in ("strided5", "strided5_pre", "strided5_post", "strided5_tiles"):
        shutil.copytree(model.parents[2] / part, repo / part)
    server = Server(repo, model="strided5_tiles")
    try:
        out = tmp_path / "triton.zarr"
        env = {**os.environ, "SEGLOOP_MODEL_REPOSITORY": str(repo)}
        proc = run_cli(
            "segment", images["rgb"], "-o", out, "--model", "strided5", "--runtime", "triton",
            "--url", server.url, "--tile", "128", "--window", "128", "--quiet", env=env,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    finally:
        assert server.stop() == 0
    root = zarr.open_group(out, mode="r")
    labels, conf = whole_image(model, images["rgb"])
    np.testing.assert_array_equal(root["labels/segmentation/0"][...], labels)
    np.testing.assert_array_equal(root["confidence/0"][...], conf)


# --- fine-tuning an added model: its own graph, run by torch operators ---------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_torch_reads_the_stored_graph_as_onnx_runtime_does(added, name):
    """``OnnxModule`` (the graph run by torch operators) equals ONNX Runtime; every weight
    of the network gets a gradient, the wrapper's (BGR swap, luminance) none; a graph
    written back with unchanged weights computes the same."""
    proto = onnx.load(str(added[name][1]))
    module = OnnxModule(proto, prefix=NET_PREFIX)
    assert check_parity(proto, module, 64) < 1e-5
    names = set(module.names.values())
    trained = {module.names[k] for k in module.params}
    assert trained and all(n.startswith(NET_PREFIX) for n in trained)
    assert {"bgr", "luminance"} & names <= names - trained  # the wrapper stays fixed
    module(torch.randn(2, 3, 32, 32)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    again = write_back(module)
    assert check_parity(again, OnnxModule(again, prefix=NET_PREFIX), 64) < 1e-5


def test_a_graph_with_an_uncovered_operator_is_refused_by_name():
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 8, 8])
    node = helper.make_node("LRN", ["x"], ["y"], size=3)
    proto = helper.make_model(helper.make_graph([node], "g", [x], [y]))
    with pytest.raises(UserError, match="uses LRN"):
        OnnxModule(proto)


def test_finetune_an_added_model_keeps_its_graph_and_stays_seam_exact(added, images, tmp_path):
    """A 5-class BGR network no one here trained: a reviewer paints class 4 over part of
    a tile and marks it corrected; `finetune --model strided5` trains the stored graph
    itself. The new version is the same graph (every node and attribute) with other
    weights, no synthetic replay; its training loss fell and it labels more of the
    painted disc class 4 (the IoUs of a random network's own noise-like labels only
    fall: it cannot sharpen them in a few steps); it carries a halo measured again, and
    its tiled output equals the whole-image run bit for bit."""
    import requests

    from tests.test_review import Server, add_user

    repo = tmp_path / "repository"
    shutil.copytree(added["strided5"][1].parents[1], repo / "strided5")
    v1 = repo / "strided5" / "1" / "model.onnx"
    store = tmp_path / "s.zarr"
    _segment(v1, images["rgb"], store, tile=256)
    token = add_user(store, "rev", "reviewer")
    server = Server(store, no_tile_pack=True)
    try:

        def call(method: str, path: str, **kw) -> dict:
            r = requests.request(
                method,
                f"{server.base}/api/images/s{path}",
                headers={"Authorization": f"Bearer {token}"},
                timeout=30,
                **kw,
            )
            assert r.status_code == 200, r.text
            return r.json()

        call("POST", "/queue/next")
        call("PUT", "/review/0/0", json={"state": "in_review"})
        body = {"op": "brush", "points": [[60, 60], [200, 150]], "radius": 40, "label": 4}
        call("POST", "/edits", json=body)
        call("PUT", "/review/0/0", json={"state": "corrected"})
    finally:
        server.stop()
    corrections = tmp_path / "corrections"
    assert run_cli("export-corrections", store, corrections).returncode == 0
    proc = run_cli(
        "finetune", "--model", "strided5", "--repository", repo, "--corrections", corrections,
        "--epochs", "30", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    v2 = repo / "strided5" / "2" / "model.onnx"
    assert out["version"] == 2 and Path(out["model"]) == v2
    assert out["after"]["in_distribution"] == {} and set(out["after"]["corrections"]) == {
        "bg",
        "a",
        "b",
        "c",
        "d",
    }
    card, parent = read_card(v2), read_card(v1)
    assert card["training"]["loss"]["last"] < card["training"]["loss"]["first"]
    assert card["version"] == 2 and card["parent_version"] == 1
    assert card["training"]["replay"] == 0 and card["training"]["finetuned_from"]["version"] == 1
    for key in ("classes", "colors", "input", "output", "mpp", "architecture"):
        assert card[key] == parent[key], key
    assert card["halo"] % card["input"]["multiple_of"] == 0 and card["halo"] >= 24
    assert "Fine-tuned from" in (repo / "strided5" / "2" / "MODEL_CARD.md").read_text()
    g1, g2 = onnx.load(str(v1)).graph, onnx.load(str(v2)).graph
    nodes = [[(n.op_type, n.attribute) for n in g.node] for g in (g1, g2)]
    assert nodes[0] == nodes[1]
    w1, w2 = ({t.name: numpy_helper.to_array(t) for t in g.initializer} for g in (g1, g2))
    assert set(w1) <= set(w2)
    moved = {k for k in w1 if not np.array_equal(w1[k], w2[k])}
    assert moved and all(k.startswith(NET_PREFIX) for k in moved)
    small = _segment(v2, images["rgb"], tmp_path / "v2_t128.zarr", tile=128, window=128)
    whole = whole_image(v2, images["rgb"])
    np.testing.assert_array_equal(small[0], whole[0])
    np.testing.assert_array_equal(small[1], whole[1])
    yy, xx = np.mgrid[:256, :256]
    disc = np.hypot(yy - 105, xx - 130) < 30  # inside the stroke (60, 60) → (200, 150), r 40
    was = whole_image(v1, images["rgb"])[0][:256, :256]
    assert (whole[0][:256, :256][disc] == 4).mean() > (was[disc] == 4).mean()


class Zoo(nn.Module):
    """Operators exporters emit, in one network: asymmetric and reflect padding, grouped,
    dilated and transposed convolutions, batch/instance/group norm, pooling with ceil
    mode, bilinear and nearest resizing, negative-step slices (flip), reductions, GELU,
    hardswish, clamp, softmax over channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8)
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.gnorm = nn.GroupNorm(2, 8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1)
        self.head = nn.Conv2d(24, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        y = nn.functional.pad(self.stem(y), (0, 1, 1, 0))[..., 1:, :-1]  # asymmetric, sliced
        y = nn.functional.gelu(self.bn(y))
        y = nn.functional.hardswish(self.inorm(self.depthwise(y)))
        y = torch.clamp(self.gnorm(y), -2.0, 2.0)
        d = nn.functional.leaky_relu(self.down(y), 0.1)
        pooled = nn.functional.max_pool2d(d, 3, 2, 1, ceil_mode=True)
        back = nn.functional.interpolate(pooled, size=d.shape[-2:], mode="bilinear")
        u = self.up(torch.sigmoid(back) * d)
        near = nn.functional.interpolate(nn.functional.avg_pool2d(y, 2), scale_factor=2.0)
        flipped = torch.flip(near, dims=[3])
        ctx = y.mean(dim=(2, 3), keepdim=True)
        out = self.head(torch.cat([u, flipped, y - ctx], 1))
        return torch.softmax(out, dim=1)


def test_torch_reads_common_exported_operators(tmp_path):
    """`OnnxModule` equals ONNX Runtime on a torch export of ``Zoo`` (random weights,
    batch norm with set statistics), at two image sizes, and every weight trains."""
    torch.manual_seed(4)
    net = Zoo()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    path = _export(net, 3, tmp_path / "zoo.onnx")
    proto = onnx.load(str(path))
    module = OnnxModule(proto)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for side in (32, 48):
        x = np.random.default_rng(side).normal(0, 1, (2, 3, side, side)).astype(np.float32)
        want = sess.run(None, {"pixels": x})[0]
        with torch.no_grad():
            got = module(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=str(side))
    module(torch.randn(1, 3, 32, 32)).log().mean().backward()
    grads = [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in module.parameters()]
    # five convolutions' weight and bias, batch norm's scale and bias, instance norm's
    # (merged by the exporter, read through Identity nodes) and GroupNorm's (Mul, Add)
    assert len(grads) >= 16 and all(grads)

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
from PIL import Image
from torch import nn

from segloop.kernels.post import windows_into
from segloop.kernels.pre import Normalisation, normalise_into
from segloop.model.add import LUMINANCE, add_model
from segloop.model.card import read_card, write_card
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

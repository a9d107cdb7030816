"""A real tritonserver (`segloop triton serve`) and `segment --runtime triton` against it."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import psutil
import pytest
from onnx import numpy_helper

from segloop.bench.process import ServerProcess
from segloop.model.card import read_card
from segloop.triton.server import free_port
from tests.conftest import ROOT, assert_user_error, read_store, run_cli

pytest.importorskip("tritonclient.grpc.aio")
try:
    from segloop.triton.server import find_server

    find_server()
except Exception as exc:
    pytest.skip(f"no tritonserver binary: {exc}", allow_module_level=True)


class Server(ServerProcess):
    """`segloop triton serve` in a child process on free ports, ready once ``model`` is."""

    def __init__(
        self,
        repo: Path,
        explicit: bool = False,
        ports: tuple | None = None,
        model: str = "segloop",
    ) -> None:
        http, self.grpc, self.metrics = ports or (free_port(), free_port(), free_port())
        cmd = [
            sys.executable, "-m", "segloop", "triton", "serve", "--model-repository", str(repo),
            "--http-port", "{port}", "--grpc-port", str(self.grpc),
            "--metrics-port", str(self.metrics),
        ]  # fmt: skip
        if explicit:
            cmd += ["--model-control-mode", "explicit"]
        super().__init__(cmd, f"/v2/models/{model}/ready", port=http, timeout_s=240)
        self.http = http

    @property
    def url(self) -> str:
        return f"localhost:{self.grpc}"

    @property
    def ports(self) -> tuple[int, int, int]:
        return self.http, self.grpc, self.metrics

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        return super().stop(sig, timeout_s)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A copy of the shipped repository (tests add versions to it)."""
    d = tmp_path_factory.mktemp("triton") / "model_repository"
    shutil.copytree(ROOT / "model_repository", d, ignore=shutil.ignore_patterns("__pycache__"))
    return d


@pytest.fixture(scope="module")
def server(repo):
    s = Server(repo, explicit=True)
    yield s
    assert s.stop() == 0, "segloop triton serve should exit 0 on SIGTERM"


def _env(repo: Path) -> dict[str, str]:
    return {**os.environ, "SEGLOOP_MODEL_REPOSITORY": str(repo)}


def _segment(slide: Path, out: Path, *extra: str, env=None) -> subprocess.CompletedProcess:
    return run_cli("segment", slide, "-o", out, "--tile", "256", "--quiet", *extra, env=env)


def _on_triton(slide: Path, out: Path, url: str, repo: Path, *extra: str):
    return _segment(slide, out, "--runtime", "triton", "--url", url, *extra, env=_env(repo))


@pytest.fixture(scope="module")
def embedded(slide, tmp_path_factory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("embedded") / "onnx.zarr"
    assert _segment(slide[0], out).returncode == 0
    return read_store(out)


def test_repository_configs_match_the_model_card():
    """pre normalises and post crops exactly as the model card says."""
    card = read_card(ROOT / "model_repository/segloop_unet/1/model.onnx")
    pre = (ROOT / "model_repository/segloop_pre/config.pbtxt").read_text()
    post = (ROOT / "model_repository/segloop_post/config.pbtxt").read_text()
    assert f'"{json.dumps(card["input"]["mean"])}"' in pre.replace("'", '"')
    assert f'"{json.dumps(card["input"]["std"])}"' in pre
    assert f'{{ key: "halo" value: {{ string_value: "{card["halo"]}" }} }}' in post


@pytest.mark.parametrize("shm", ["system", "none"])
def test_ensemble_equals_embedded_runtime(server, repo, slide, embedded, tmp_path, shm):
    out = tmp_path / "triton.zarr"
    proc = _on_triton(slide[0], out, server.url, repo, "--triton-shm", shm)
    assert proc.returncode == 0, proc.stderr
    got = read_store(out)
    # "0" (the image copy) only where the store holds one (not for a pyramidal source)
    for key in ("labels/segmentation/0", "confidence/0", "labels/segmentation/1", "0"):
        assert (key in got) == (key in embedded), key
        if key in embedded:
            np.testing.assert_array_equal(got[key], embedded[key], err_msg=key)
    record = json.loads((out / "segloop" / "segloop.json").read_text())
    assert record["params"]["runtime"] == "triton" and record["model"]["version"] == 1


def test_two_urls_share_the_work(server, repo, slide, embedded, tmp_path):
    """The same server twice in --url: requests alternate; result unchanged."""
    out = tmp_path / "two.zarr"
    proc = _on_triton(slide[0], out, f"{server.url},127.0.0.1:{server.grpc}", repo)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(
        read_store(out)["labels/segmentation/0"], embedded["labels/segmentation/0"]
    )


def _wait_for_shards(client: subprocess.Popen, out: Path, n: int) -> None:
    """Until the job's manifest lists ``n`` shards (the client must still be running)."""
    manifest = out / "segloop" / "segloop.manifest"
    deadline = time.monotonic() + 120
    while not (manifest.exists() and manifest.read_text().count("\n") >= n):
        assert client.poll() is None, client.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)


def _crash(server: Server) -> list:
    """SIGKILL `segloop triton serve` and its tritonserver child at once (a node crash);
    returns the killed children."""
    family = psutil.Process(server.proc.pid).children(recursive=True)
    server.proc.send_signal(signal.SIGKILL)
    for p in family:
        p.kill()
    server.proc.wait()
    server.close()
    return family


def test_fleet_survives_one_endpoint_dying(server, slide, embedded, tmp_path):
    """Two servers in --url, one killed mid-job: it is taken out, the other finishes the
    job, and the store equals the embedded run."""
    repo_b = tmp_path / "model_repository"
    shutil.copytree(ROOT / "model_repository", repo_b, ignore=shutil.ignore_patterns("__pycache__"))
    doomed = Server(repo_b)
    out = tmp_path / "fleet.zarr"
    cmd = [sys.executable, "-m", "segloop", "segment", str(slide[0]), "-o", str(out)]
    args = ["--tile", "256", "--shard", "256", "--runtime", "triton", "--quiet"]
    client = subprocess.Popen(
        [*cmd, *args, "--url", f"{server.url},{doomed.url}"],
        stderr=subprocess.PIPE,
        text=True,
        env=_env(repo_b),
    )
    _wait_for_shards(client, out, 2)
    _crash(doomed)
    _, err = client.communicate(timeout=180)
    assert client.returncode == 0, err
    got = read_store(out)
    for key in embedded:
        np.testing.assert_array_equal(got[key], embedded[key], err_msg=key)


def test_unreachable_server_is_a_clear_error(slide, tmp_path):
    proc = _segment(
        slide[0], tmp_path / "o.zarr", "--runtime", "triton", "--url", f"localhost:{free_port()}"
    )
    assert_user_error(proc, "cannot reach triton", "segloop triton serve")


def test_serve_refuses_a_taken_port(server, repo):
    proc = run_cli(
        "triton",
        "serve",
        "--model-repository",
        repo,
        "--http-port",
        str(server.http),
        "--grpc-port",
        str(free_port()),
        "--metrics-port",
        str(free_port()),
        timeout=60,
    )
    assert_user_error(proc, f"port {server.http}", "--http-port")


def test_serve_refuses_a_folder_that_is_not_a_repository(tmp_path):
    proc = run_cli(
        "triton",
        "serve",
        "--model-repository",
        tmp_path,
        "--http-port",
        str(free_port()),
        timeout=60,
    )
    assert_user_error(proc, "not a triton model repository")


def _make_version_2(repo: Path) -> Path:
    """segloop_unet/2: v1 with the nucleus logit raised (visibly different masks)."""
    src = repo / "segloop_unet/1"
    dst = repo / "segloop_unet/2"
    dst.mkdir()
    shutil.copy(src / "model.py", dst / "model.py")
    proto = onnx.load(str(src / "model.onnx"))
    head = [t for t in proto.graph.initializer if t.name.startswith("head") and "bias" in t.name]
    bias = numpy_helper.to_array(head[0]).copy()
    bias[2] += 3.0
    head[0].CopyFrom(numpy_helper.from_array(bias, head[0].name))
    for p in proto.metadata_props:
        if p.key == "version":
            p.value = "2"
        elif p.key == "parent_version":
            p.value = "1"
    onnx.save(proto, str(dst / "model.onnx"))
    return dst / "model.onnx"


def test_new_version_loaded_explicitly_serves_the_next_job(server, repo, slide, embedded, tmp_path):
    import tritonclient.grpc as grpcclient

    v2 = _make_version_2(repo)
    client = grpcclient.InferenceServerClient(server.url)
    client.load_model("segloop_unet")  # explicit mode: picks up version 2, unloads 1
    deadline = time.monotonic() + 60
    while not (client.is_model_ready("segloop_unet", "2") and client.is_model_ready("segloop")):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    out = tmp_path / "v2.zarr"
    proc = _on_triton(slide[0], out, server.url, repo)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "segloop" / "segloop.json").read_text())
    assert record["model"]["version"] == 2
    assert record["model"]["sha256"] == read_card(v2)["sha256"]
    labels = read_store(out)["labels/segmentation/0"]
    v1 = embedded["labels/segmentation/0"]
    assert np.mean(labels != v1) > 0.002 and np.mean(labels == 2) > np.mean(v1 == 2)
    ref = tmp_path / "v2_onnx.zarr"
    assert _segment(slide[0], ref, "--model", v2).returncode == 0
    np.testing.assert_array_equal(labels, read_store(ref)["labels/segmentation/0"])


def test_finetune_loads_its_new_version_on_triton(server, repo, slide, slide_rgb, tmp_path):
    """`segloop finetune --triton URL` writes the next version and Triton serves it."""
    import tifffile
    import tritonclient.grpc as grpcclient

    from segloop.review.export import FORMAT, FORMAT_VERSION

    corrections = tmp_path / "corrections"
    (corrections / "tiles").mkdir(parents=True)
    truth = tifffile.imread(slide[1])
    items = []
    for y, x in ((0, 0), (512, 256)):  # two tiles labelled by the ground truth
        name = f"tiles/t{y}_{x}.npz"
        corrected = truth[y : y + 256, x : x + 256]
        np.savez(
            corrections / name,
            image=slide_rgb[y : y + 256, x : x + 256],
            prediction=corrected,
            corrected=corrected,
            changed=np.zeros_like(corrected, bool),
            ignore=np.zeros_like(corrected, bool),
        )
        items.append({"file": name, "box": [y, y + 256, x, x + 256], "reviewer": "t",
                      "role": "reviewer", "changed_px": 0})  # fmt: skip
    index = {"format": FORMAT, "version": FORMAT_VERSION, "store": "t", "exported": 0}
    (corrections / "index.json").write_text(json.dumps({**index, "items": items}))
    newest = max(int(p.name) for p in (repo / "segloop_unet").glob("[0-9]*"))
    proc = run_cli(
        "finetune",
        "--model",
        repo / "segloop_unet/1/model.onnx",
        "--corrections",
        corrections,
        "--epochs",
        "1",
        "--triton",
        server.url,
        env=_env(repo),
    )
    assert proc.returncode == 0, proc.stderr
    client = grpcclient.InferenceServerClient(server.url)
    assert client.is_model_ready("segloop_unet", str(newest + 1))
    out = tmp_path / "tuned.zarr"
    assert _on_triton(slide[0], out, server.url, repo).returncode == 0
    record = json.loads((out / "segloop" / "segloop.json").read_text())
    assert record["model"]["version"] == newest + 1
    assert (
        record["model"]["sha256"]
        == read_card(repo / f"segloop_unet/{newest + 1}/model.onnx")["sha256"]
    )


def test_server_killed_mid_job_then_resume(slide, embedded, tmp_path):
    """kill -9 the server mid-job: the client stops with one clear line; after a restart
    the same command resumes and the store equals the embedded run bit for bit."""
    repo = tmp_path / "model_repository"
    shutil.copytree(ROOT / "model_repository", repo, ignore=shutil.ignore_patterns("__pycache__"))
    server = Server(repo)
    out = tmp_path / "killed.zarr"
    args = [
        "segment",
        str(slide[0]),
        "-o",
        str(out),
        "--tile",
        "256",
        "--shard",
        "256",
        "--runtime",
        "triton",
        "--url",
        server.url,
    ]
    client = subprocess.Popen(
        [sys.executable, "-m", "segloop", *args, "--quiet"],
        stderr=subprocess.PIPE,
        text=True,
        env=_env(repo),
    )
    _wait_for_shards(client, out, 2)
    family = _crash(server)
    _, err = client.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert client.returncode == 2 and len(lines) == 1, err
    assert "run the same command again to resume" in lines[0]
    assert json.loads((out / "segloop" / "segloop.json").read_text())["status"] == "running"

    for p in family:  # the killed server's python stubs may hold its sockets a moment
        with contextlib.suppress(psutil.Error):
            p.wait(30)
    restarted = Server(repo, ports=server.ports)
    try:
        proc = run_cli(*args, "--json", env=_env(repo))
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout.splitlines()[-1])["stats"]["resumed"] is True
    finally:
        restarted.stop()
    got = read_store(out)
    for key in embedded:
        np.testing.assert_array_equal(got[key], embedded[key], err_msg=key)


def test_tensorrt_plan_build(tmp_path):
    """The container's engine build (fp16, dynamic profile); needs TensorRT and a GPU."""
    pytest.importorskip(
        "tensorrt",
        reason="TensorRT cannot be installed on these machines; "
        "the plan is built only in the GPU container (Dockerfile)",
    )
    from segloop.runtimes.tensorrt_plans import build_missing

    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "model_repository/segloop_unet", repo / "segloop_unet")
    plans = build_missing(repo)
    assert plans and all(p.stat().st_size > 0 for p in plans)
    assert build_missing(repo) == []  # stamped for this GPU: not rebuilt


# --- wire contract ----------------------------------------------------------------------


def _infer(url: str, windows: np.ndarray):
    """One request to the ``segloop`` ensemble: (labels, confidence), or the exception."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(url)
    try:
        inp = grpcclient.InferInput("TILES", list(windows.shape), "UINT8")
        inp.set_data_from_numpy(windows)
        outs = [grpcclient.InferRequestedOutput(n) for n in ("LABELS", "CONFIDENCE")]
        result = client.infer("segloop", [inp], outputs=outs)
        return result.as_numpy("LABELS"), result.as_numpy("CONFIDENCE")
    except InferenceServerException as exc:
        return exc
    finally:
        client.close()


def _embedded(windows: np.ndarray, halo: int) -> tuple[np.ndarray, np.ndarray]:
    """The same windows through pre → ONNX Runtime → post in this process."""
    from segloop.kernels.pre import Normalisation, normalise_into
    from segloop.pipeline.segment import default_model
    from segloop.runtimes import create_runtime
    from segloop.triton.contract import CHANNELS

    b, sh, sw, c = windows.shape
    card = read_card(default_model())
    norm = Normalisation(tuple(card["input"]["mean"]), tuple(card["input"]["std"]), CHANNELS[c])
    arr = np.empty((b, 3, sh, sw), np.float32)
    rows, cols = np.arange(sh, dtype=np.intp), np.arange(sw, dtype=np.intp)
    for i in range(b):
        normalise_into(windows[i], rows, cols, norm, arr[i])
    logits = create_runtime("onnx", default_model(), 2).run(arr)
    from segloop.kernels import post

    h, w = sh - 2 * halo, sw - 2 * halo
    labels, conf = np.empty((b, h, w), np.uint8), np.empty((b, h, w), np.uint8)
    post._labels_confidence(logits, halo, labels, conf)
    return labels, conf


def test_pre_config_carries_the_model_cards_halo_and_stride():
    card = read_card(ROOT / "model_repository/segloop_unet/1/model.onnx")
    for cfg in ("config.pbtxt", "configs/gpu.pbtxt"):
        pre = (ROOT / "model_repository/segloop_pre" / cfg).read_text()
        assert f'{{ key: "halo" value: {{ string_value: "{card["halo"]}" }} }}' in pre
        stride = card["input"]["multiple_of"]
        assert f'{{ key: "multiple_of" value: {{ string_value: "{stride}" }} }}' in pre


@pytest.mark.parametrize(
    "shape",
    [(1, 608, 536, 3), (2, 200, 304, 1), (1, 104, 112, 4), (3, 352, 352, 3)],
    ids=["rgb", "gray", "rgba", "square"],
)
def test_non_square_windows_come_back_right(server, shape):
    """Any valid shape: (B, Sh, Sw, C) in → (B, Sh − 2·halo, Sw − 2·halo) out, equal to the
    embedded pre → ONNX Runtime → post on the same windows."""
    rng = np.random.default_rng(sum(shape))
    windows = rng.integers(0, 256, shape, dtype=np.uint8)
    got = _infer(server.url, windows)
    assert not isinstance(got, Exception), got
    labels, conf = got
    b, sh, sw, _ = shape
    assert labels.shape == conf.shape == (b, sh - 96, sw - 96)
    want_l, want_c = _embedded(windows, 48)
    np.testing.assert_array_equal(labels, want_l)
    # random-noise windows sit near rounding boundaries; ONNX Runtime inside the server
    # (its own thread count, batches merged by the dynamic batcher) may round the last
    # float bit differently: confidence within one step, on a few pixels in 10⁴ at most
    # (measured: up to 1.02e-4 of them, 23 of the 225 280 of the rgb case, once)
    diff = np.abs(conf.astype(int) - want_c)
    assert diff.max() <= 1 and np.mean(diff > 0) < 5e-4


@pytest.mark.parametrize(
    ("shape", "rule"),
    [
        ((1, 604, 608, 3), "window height 604 must be a multiple of 8"),
        ((1, 608, 541, 3), "window width 541 must be a multiple of 8"),
        ((1, 96, 200, 3), "window height 96 must be larger than 2 × halo = 96"),
        ((2, 104, 104, 2), "must have 1, 3 or 4 channels"),
    ],
    ids=["height-stride", "width-stride", "no-core", "two-channels"],
)
def test_invalid_windows_are_refused_naming_the_rule(server, shape, rule):
    exc = _infer(server.url, np.zeros(shape, np.uint8))
    assert isinstance(exc, Exception), f"{shape} was accepted"
    assert "INVALID_ARGUMENT" in str(exc.status()), (exc.status(), exc.message())
    assert rule in exc.message(), exc.message()
    assert str(ROOT) not in exc.message() and "site-packages" not in exc.message()


def test_serve_binds_loopback_by_default(server):
    """tritonserver is told to bind 127.0.0.1 (HTTP, gRPC, metrics) and listens nowhere else."""
    from segloop.triton.server import ServerOptions, TritonServer

    cmd, _ = TritonServer(ServerOptions(model_repository=ROOT / "model_repository")).command()
    for flag in ("--http-address", "--grpc-address", "--metrics-address"):
        assert f"{flag}=127.0.0.1" in cmd
    cmd, _ = TritonServer(
        ServerOptions(model_repository=ROOT / "model_repository", host="0.0.0.0")
    ).command()
    assert "--grpc-address=0.0.0.0" in cmd
    family = psutil.Process(server.proc.pid).children(recursive=True)
    listening = {
        (c.laddr.ip, c.laddr.port)
        for p in family
        for c in p.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN
    }
    ports = {port for _, port in listening}
    assert {server.http, server.grpc, server.metrics} <= ports, listening
    for ip, port in listening:
        if port in (server.http, server.grpc, server.metrics):
            addr = ipaddress.ip_address(ip)
            addr = getattr(addr, "ipv4_mapped", None) or addr  # gRPC: ::ffff:127.0.0.1
            assert addr.is_loopback, (ip, port)


def test_serve_learn_predicts_with_the_new_version_on_triton(base_store, tmp_path):
    """`serve --learn --runtime triton`: the learner loads its new version on a Triton in
    explicit mode and predicts through it; the tiles are the embedded runtime's bits."""
    import tritonclient.grpc as grpcclient
    import zarr

    from tests.test_learn import FAST, TILE, Session, fresh_repository

    repo = fresh_repository(tmp_path)
    triton = Server(repo, explicit=True)
    try:
        s = Session(
            base_store, tmp_path, "--every", "1", *FAST, "--runtime", "triton", "--url",
            triton.url, repo=repo,
        )  # fmt: skip
        try:
            s.call("PUT", "/review/0/1", json={"state": "accepted"})
            model = s.wait(lambda m: m["served"]["version"] == 2 and m["round"] is None)
            assert model["updates"][-1]["version"] == 2
            client = grpcclient.InferenceServerClient(triton.url)
            assert client.is_model_ready("segloop_unet", "2")
            served = {t: s.tile("segmentation", *t) for t in [(1, 1), (2, 3), (5, 5)]}
        finally:
            s.stop()
    finally:
        triton.stop()
    ref = tmp_path / "v2_onnx.zarr"
    v2 = repo / "segloop_unet" / "2" / "model.onnx"
    proc = _segment(base_store_image(base_store), ref, "--model", v2)
    assert proc.returncode == 0, proc.stderr
    want = zarr.open_array(ref / "labels/segmentation/0", mode="r")[...]
    for ty, tx in served:
        tile = want[ty * TILE : (ty + 1) * TILE, tx * TILE : (tx + 1) * TILE]
        assert served[ty, tx] == tile.tobytes(), (ty, tx)


def base_store_image(store: Path) -> str:
    """The input a source-mode store reads its image from."""
    return json.loads((store / "segloop" / "segloop.json").read_text())["image"]["path"]

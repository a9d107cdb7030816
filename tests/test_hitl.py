"""Human in the loop: tile uncertainty, export-corrections, finetune, --only unreviewed,
feedback statistics — on a real store, a real review server and real SQLite."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import tifffile
import torch
import zarr
from onnx import numpy_helper

from segloop.model.card import read_card
from segloop.model.corrections import IGNORE, CorrectionsDataset
from segloop.pipeline.pyramid import downsample_mode
from segloop.review.db import ReviewDB
from tests.conftest import ROOT, assert_user_error, run_cli
from tests.test_review import TILE, Server, add_user, labels

IMAGE = "/api/images/slide"


@pytest.fixture(scope="module")
def reviewed(base_store, tmp_path_factory):
    """A copy of the store reviewed through the HTTP API:

    tile (0, 0) corrected by the reviewer (one stroke), (0, 1) accepted unchanged, (1, 0)
    edited by the annotator only (a pending proposal), (1, 1) edited by the annotator and
    then partly repainted and accepted by the reviewer."""
    store = tmp_path_factory.mktemp("reviewed") / "slide.zarr"
    shutil.copytree(base_store, store)
    tokens = {r: add_user(store, r, r) for r in ("annotator", "reviewer")}
    server = Server(store)
    import requests

    def call(method: str, path: str, who: str, **kw) -> requests.Response:
        headers = {"Authorization": f"Bearer {tokens[who]}"}
        r = requests.request(method, server.base + IMAGE + path, headers=headers, timeout=30, **kw)
        assert r.status_code == 200, r.text
        return r.json()

    def stroke(x: int, y: int, label: int, who: str) -> dict:
        body = {"op": "brush", "points": [[x, y], [x + 60, y + 40]], "radius": 12, "label": label}
        return call("POST", "/edits", who, json=body)

    lease = call("POST", "/queue/next", "reviewer")
    call("PUT", "/review/0/0", "reviewer", json={"state": "in_review"})
    stroke(40, 40, 2, "reviewer")
    call("PUT", "/review/0/0", "reviewer", json={"state": "corrected"})
    call("PUT", "/review/0/1", "reviewer", json={"state": "accepted"})
    stroke(40, TILE + 40, 2, "annotator")
    stroke(TILE + 40, TILE + 40, 2, "annotator")
    stroke(TILE + 60, TILE + 50, 1, "reviewer")
    call("PUT", "/review/1/1", "reviewer", json={"state": "accepted"})
    stats = call("GET", "/stats", "reviewer")
    yield {"store": store, "server": server, "lease": lease, "stats": stats}
    server.stop()


def _tile(a: np.ndarray, ty: int, tx: int) -> np.ndarray:
    return a[..., ty * TILE : (ty + 1) * TILE, tx * TILE : (tx + 1) * TILE]


def test_segment_stores_tile_uncertainty_and_the_queue_follows_it(base_store, reviewed):
    root = zarr.open_group(base_store, mode="r")
    conf = root["confidence/0"][...].astype(np.float64)
    u = root["tiles/uncertainty"][...]
    ny, nx = -(-conf.shape[0] // TILE), -(-conf.shape[1] // TILE)
    assert u.shape == (ny, nx) and root["tiles/model_version"][...].tolist() == [[1] * nx] * ny
    for ty in range(ny):
        for tx in range(nx):  # independent definition: mean of 1 − c/255 over the tile
            assert u[ty, tx] == pytest.approx(np.mean(1 - _tile(conf, ty, tx) / 255), abs=1e-5)
    assert reviewed["lease"]["tile"] == list(np.unravel_index(np.argmax(u), u.shape))


def test_export_corrections_round_trip(base_store, reviewed, slide, tmp_path):
    store, out = reviewed["store"], tmp_path / "corrections"
    proc = run_cli("export-corrections", store, out)
    assert proc.returncode == 0, proc.stderr
    index = json.loads((out / "index.json").read_text())
    items = {tuple(it["tile"]): it for it in index["items"]}
    assert set(items) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert items[(0, 0)]["state"] == "corrected" and items[(0, 0)]["reviewer"] == "reviewer"
    assert items[(0, 0)]["seconds"] > 0  # from in_review to corrected
    assert items[(0, 1)]["state"] == "accepted" and items[(0, 1)]["changed_px"] == 0
    assert items[(1, 0)]["state"] == "edited" and items[(1, 0)]["role"] == "annotator"
    assert items[(1, 1)]["editors"] == ["annotator", "reviewer"]
    assert all(it["model_version"] == 1 for it in items.values())
    before, now = labels(base_store), labels(store)
    record = json.loads((store / "segloop" / "segloop.json").read_text())
    assert record["image"]["mode"] == "source"  # exported from the input, read in place
    image = np.moveaxis(tifffile.imread(slide[0]), -1, 0)
    for (ty, tx), it in items.items():
        with np.load(out / it["file"]) as z:
            np.testing.assert_array_equal(z["prediction"], _tile(before, ty, tx))
            np.testing.assert_array_equal(z["corrected"], _tile(now, ty, tx))
            np.testing.assert_array_equal(z["changed"], z["prediction"] != z["corrected"])
            np.testing.assert_array_equal(z["image"], np.moveaxis(_tile(image, ty, tx), 0, -1))
            assert z["changed"].sum() == it["changed_px"]
            if it["state"] == "edited":  # only the pixels the annotator changed are labels
                np.testing.assert_array_equal(z["ignore"], ~z["changed"])
            else:
                assert not z["ignore"].any()
    data = CorrectionsDataset(out)
    rgb, target = data[[it["tile"] for it in data.items].index([1, 0])]
    assert rgb.shape == (TILE, TILE, 3) and rgb.dtype == np.uint8
    assert target.dtype == torch.int64 and (target == IGNORE).sum() > 0.9 * target.numel()

    approved = tmp_path / "approved"
    assert run_cli("export-corrections", store, approved, "--approved-only").returncode == 0
    kept = {tuple(it["tile"]) for it in json.loads((approved / "index.json").read_text())["items"]}
    assert kept == {(0, 0), (0, 1)}  # (1, 0) unreviewed proposal, (1, 1) has a pending one
    later = tmp_path / "later"
    assert run_cli("export-corrections", store, later, "--since", "2999-01-01").returncode == 0
    assert json.loads((later / "index.json").read_text())["items"] == []


def test_export_refuses_to_overwrite_and_bad_since(reviewed, tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_user_error(run_cli("export-corrections", reviewed["store"], out), "--overwrite")
    proc = run_cli("export-corrections", reviewed["store"], out, "--overwrite")
    assert_user_error(proc, "not a corrections export")
    assert (out / "keep.txt").read_text() == "mine"
    proc = run_cli("export-corrections", reviewed["store"], tmp_path / "y", "--since", "soon")
    assert_user_error(proc, "--since")


def test_stats_per_user_and_agreement(reviewed):
    users = {u["user"]: u for u in reviewed["stats"]["users"]}
    assert users["annotator"]["edits"] == {"brush": 2}
    assert users["annotator"]["proposals"] == {"proposed": 2}
    assert users["reviewer"]["tiles"] == {"corrected": 1, "accepted": 2}
    assert users["reviewer"]["pixels"] > 0 and users["reviewer"]["median_seconds_per_tile"] >= 0
    agree = reviewed["stats"]["agreement"]
    assert agree["tiles"] == 1  # (1, 1): annotated, then repainted by the reviewer
    tile = agree["per_tile"][0]
    assert tile["tile"] == [1, 1] and tile["annotator"] == "annotator"
    assert 0 < tile["mean_iou"] < 1 and tile["changed_px"] > 0


def test_finetune_then_only_unreviewed_keeps_human_tiles(base_store, reviewed, slide, tmp_path):
    store = reviewed["store"]
    proc = run_cli("segment", slide[0], "-o", store, "--only", "unreviewed")
    assert_user_error(proc, "in use")  # the review server holds the store
    reviewed["server"].stop()

    corrections, repo = tmp_path / "corrections", tmp_path / "model_repository"
    shutil.copytree(ROOT / "model_repository", repo, ignore=shutil.ignore_patterns("__pycache__"))
    assert run_cli("export-corrections", store, corrections).returncode == 0
    v1 = repo / "segloop_unet/1/model.onnx"
    proc = run_cli(
        "finetune", "--model", v1, "--corrections", corrections, "--epochs", "1", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    v2 = repo / "segloop_unet/2/model.onnx"
    assert json.loads(proc.stdout.splitlines()[-1])["version"] == 2 and v2.exists()
    card = read_card(v2)
    assert card["version"] == 2 and card["parent_version"] == 1
    assert card["training"]["corrections"]["tiles"] == 4
    assert (repo / "segloop_unet/2/model.py").exists()
    assert "Fine-tuned from" in (repo / "segloop_unet/2/MODEL_CARD.md").read_text()
    w1, w2 = (
        {t.name: numpy_helper.to_array(t) for t in onnx.load(str(p)).graph.initializer}
        for p in (v1, v2)
    )
    assert any(not np.array_equal(w1[k], w2[k]) for k in w1)  # the weights moved

    human = ReviewDB.human_tiles(store)
    assert human == {(0, 0), (0, 1), (1, 0), (1, 1)}

    def confidence(path: Path) -> np.ndarray:
        return zarr.open_array(path / "confidence/0", mode="r")[...]

    before, conf_before = labels(store), confidence(store)
    proc = run_cli("segment", slide[0], "-o", store, "--only", "unreviewed", "--model", v2)
    assert proc.returncode == 0, proc.stderr
    after, conf_after = labels(store), confidence(store)
    fresh = tmp_path / "v2.zarr"
    proc = run_cli("segment", slide[0], "-o", fresh, "--tile", str(TILE), "--model", v2)
    assert proc.returncode == 0, proc.stderr
    v2_labels, v2_conf = labels(fresh), confidence(fresh)
    versions = zarr.open_array(store / "tiles/model_version", mode="r")[...]
    for ty in range(versions.shape[0]):
        for tx in range(versions.shape[1]):
            if (ty, tx) in human:  # human work: byte for byte what it was
                np.testing.assert_array_equal(_tile(after, ty, tx), _tile(before, ty, tx))
                assert versions[ty, tx] == 1
            else:
                np.testing.assert_array_equal(_tile(after, ty, tx), _tile(v2_labels, ty, tx))
                np.testing.assert_array_equal(_tile(conf_after, ty, tx), _tile(v2_conf, ty, tx))
                assert versions[ty, tx] == 2
    assert np.any(conf_after != conf_before)  # one step of fine-tuning: masks barely move
    np.testing.assert_array_equal(labels(store, 1), downsample_mode(after))
    record = json.loads((store / "segloop" / "segloop.json").read_text())
    assert record["generation"] == 1
    entry = record["history"][-1]
    assert entry["status"] == "complete" and entry["model"]["version"] == 2
    assert sorted(map(tuple, entry["kept_human_tiles"])) == sorted(human)
    # the review server sees new versions of the rewritten chunks (clients refetch them)
    db = ReviewDB(store)
    assert db.versions("segmentation", 0).get((2, 2), 0) >= 1
    assert (0, 1) not in db.versions("segmentation", 0)  # accepted, untouched: no bump
    db.close()


def test_only_unreviewed_refuses_another_image_and_unfinished_stores(base_store, tmp_path):
    other = tmp_path / "other.png"
    from PIL import Image

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(other)
    assert_user_error(
        run_cli("segment", other, "-o", base_store, "--only", "unreviewed"), "another image"
    )
    assert_user_error(
        run_cli("segment", other, "-o", tmp_path / "none.zarr", "--only", "unreviewed"),
        "not a finished segloop store",
    )

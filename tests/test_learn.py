"""Continuous learning (``segloop serve --learn``): a real review server, store, SQLite,
learner process and ONNX Runtime (Triton: ``test_learn_triton`` below); short rounds
(a few optimiser steps on small crops), so the tests check the mechanics, not the gain
(``benchmarks/hitl_continuous.py`` measures that)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import zarr

from segloop.model.card import read_card
from tests.conftest import ROOT, assert_user_error, run_cli
from tests.test_review import TILE, Server, add_user

IMAGE = "/api/images/slide"
#: a round: 4 steps on 128² crops at a learning rate too small to make it worse (gated);
#: normal priority: at idle priority a machine busy with other work would starve it
FAST = ("--learn-steps", "4", "--learn-lr", "1e-5", "--learn-priority", "normal")
#: a round that trains until it is killed
ENDLESS = ("--learn-steps", "100000", "--learn-priority", "normal")


def fresh_repository(tmp: Path) -> Path:
    """A copy of the shipped model repository with version 1 only."""
    repo = tmp / "model_repository"
    shutil.copytree(
        ROOT / "model_repository", repo, ignore=shutil.ignore_patterns("__pycache__", "[2-9]*")
    )
    return repo


class Session:
    """A store copy, its users, its model repository and a ``serve --learn`` on them."""

    def __init__(self, base_store: Path, tmp: Path, *flags: str, repo: Path | None = None):
        """``repo``: the model repository (default: a fresh copy of the shipped one)."""
        self.store = tmp / "slide.zarr"
        shutil.copytree(base_store, self.store)
        self.repo = repo or fresh_repository(tmp)
        self.tokens = {r: add_user(self.store, r, r) for r in ("annotator", "reviewer")}
        env = {**os.environ, "SEGLOOP_MODEL_REPOSITORY": str(self.repo)}
        self.server = Server(self.store, env=env, args=("--learn", *flags))

    def call(self, method: str, path: str, who: str = "reviewer", ok: bool = True, **kw):
        headers = {"Authorization": f"Bearer {self.tokens[who]}"}
        r = requests.request(
            method, self.server.base + IMAGE + path, headers=headers, timeout=60, **kw
        )
        if ok:
            assert r.status_code in (200, 202), r.text
            return r.json()
        return r

    def stroke(self, ty: int, tx: int, label: int, who: str = "reviewer") -> dict:
        y, x = ty * TILE + 60, tx * TILE + 60
        body = {"op": "brush", "points": [[x, y], [x + 80, y + 60]], "radius": 14, "label": label}
        return self.call("POST", "/edits", who, json=body)

    def tile(self, layer: str, ty: int, tx: int) -> bytes:
        headers = {"Accept": "application/octet-stream"}
        return self.call_raw(f"/tiles/{layer}/0/{ty}/{tx}", headers)

    def call_raw(self, path: str, headers: dict) -> bytes:
        headers = {**headers, "Authorization": f"Bearer {self.tokens['reviewer']}"}
        r = requests.get(self.server.base + IMAGE + path, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        return r.content

    def tiles(self, layer: str = "segmentation") -> dict[tuple[int, int], bytes]:
        ny, nx = self.grid
        return {(ty, tx): self.tile(layer, ty, tx) for ty in range(ny) for tx in range(nx)}

    @property
    def grid(self) -> tuple[int, int]:
        return zarr.open_array(self.store / "tiles/model_version", mode="r").shape

    def wait(self, what, timeout: float = 240.0) -> dict:
        """Poll ``GET …/model`` until ``what(model)`` holds (a round's end, typically)."""
        deadline = time.monotonic() + timeout
        while True:
            model = self.call("GET", "/model")
            if what(model):
                return model
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting on the learner: {json.dumps(model)}")
            time.sleep(0.2)

    def idle(self, model: dict) -> bool:
        return model["round"] is None

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
def learned(base_store, tmp_path_factory):
    """A session after one round: the reviewer corrected (0, 0) and accepted (0, 1) (K=2);
    before that, the annotator proposed a stroke on (2, 2) that the reviewer rejected,
    and one on (3, 3) nobody decided (an annotator without measured agreement)."""
    s = Session(base_store, tmp_path_factory.mktemp("learn"), "--every", "2", *FAST)
    before = {"seg": s.tiles(), "conf": s.tiles("confidence")}
    rejected = s.stroke(2, 2, 2, who="annotator")
    s.call("POST", f"/edits/{rejected['edit_id']}/decision", json={"decision": "reject"})
    s.stroke(3, 3, 2, who="annotator")
    s.call("POST", "/model/focus", "annotator", json={"tile": [5, 4]})  # where they look
    s.stroke(0, 0, 2)
    s.call("PUT", "/review/0/0", json={"state": "corrected"})
    s.call("PUT", "/review/0/1", json={"state": "accepted"})
    model = s.wait(lambda m: m["served"]["version"] == 2 and s.idle(m))
    after = {"seg": s.tiles(), "conf": s.tiles("confidence")}
    yield {"s": s, "before": before, "after": after, "model": model}
    s.stop()


def test_k_verdicts_make_a_new_version_that_is_served(learned):
    s, model = learned["s"], learned["model"]
    assert [(v["version"], v["status"]) for v in model["versions"]] == [(1, "kept"), (2, "served")]
    v2 = model["versions"][1]
    assert v2["parent"] == 1 and v2["trained_on"] >= 2 and "score" in v2 and "parent_score" in v2
    card = read_card(s.repo / "segloop_unet" / "2" / "model.onnx")
    assert card["version"] == 2 and card["parent_version"] == 1
    assert card["training"]["finetuned_from"]["version"] == 1
    assert model["updates"] and model["updates"][-1]["version"] == 2
    assert model["seconds_verdict_to_update"]  # measured for the verdicts of the round


def test_unreviewed_tiles_change_and_human_tiles_are_byte_identical(learned, base_store):
    s, before, after = learned["s"], learned["before"], learned["after"]
    human = {(0, 0), (0, 1), (2, 2), (3, 3)}  # edited (even if rejected) or given a verdict
    for tile in human - {(0, 0), (2, 2), (3, 3)}:
        assert after["seg"][tile] == before["seg"][tile], tile
    for tile in human:
        assert after["conf"][tile] == before["conf"][tile], tile
    versions = zarr.open_array(s.store / "tiles/model_version", mode="r")[...]
    ny, nx = versions.shape
    others = [(ty, tx) for ty in range(ny) for tx in range(nx) if (ty, tx) not in human]
    assert all(versions[t] == 2 for t in others) and all(versions[t] == 1 for t in human)
    assert any(after["conf"][t] != before["conf"][t] for t in others)  # a new model
    # what is served is what v2 predicts: the same bits as `segment` with v2
    out = s.store.parent / "v2.zarr"
    slide = json.loads((s.store / "segloop" / "segloop.json").read_text())["image"]["path"]
    proc = run_cli(
        "segment", slide, "-o", out, "--tile", str(TILE), "--quiet",
        "--model", s.repo / "segloop_unet" / "2" / "model.onnx",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    want = zarr.open_array(out / "labels/segmentation/0", mode="r")[...]
    for ty, tx in others:
        tile = want[ty * TILE : (ty + 1) * TILE, tx * TILE : (tx + 1) * TILE]
        assert after["seg"][ty, tx] == tile.tobytes(), (ty, tx)
    u = zarr.open_array(out / "tiles/uncertainty", mode="r")[...]
    served_u = zarr.open_array(s.store / "tiles/uncertainty", mode="r")[...]
    np.testing.assert_array_equal(served_u[versions == 2], u[versions == 2])


def test_tiles_nearest_to_where_reviewers_look_are_predicted_first(learned):
    s = learned["s"]
    job = json.loads((s.store / "segloop" / "learn" / "rounds" / "v2" / "job.json").read_text())
    order = [tuple(t) for t in job["tiles"]]
    assert order[0] == (5, 4)  # the annotator's view centre
    # then the neighbours of the view and of the last verdicts, (0, 0) and (0, 1)
    near = {(4, 4), (5, 3), (5, 5), (4, 3), (4, 5), (1, 0), (1, 1), (0, 2), (1, 2)}
    assert set(order[1:4]) <= near
    assert {(0, 0), (0, 1), (2, 2), (3, 3)}.isdisjoint(order)  # human tiles: never
    r = s.call("POST", "/model/focus", json={"tile": [99, 0]}, ok=False)
    assert r.status_code == 404


def test_rejected_and_untrusted_proposals_never_reach_training(learned):
    s = learned["s"]
    rounds = s.store / "segloop" / "learn" / "rounds" / "v2"
    trained = json.loads((rounds / "training_set.json").read_text())
    tiles = {tuple(t[:2]) for t in trained["tiles"]}
    assert tiles == {(0, 0), (0, 1)}
    excluded = {tuple(e["tile"]): e["why"] for e in trained["excluded"]}
    assert "annotator" in excluded[(3, 3)] and "agreement" in excluded[(3, 3)]
    index = json.loads((rounds / "corrections" / "index.json").read_text())
    assert {tuple(it["tile"]) for it in index["items"]} == {(0, 0), (0, 1)}


def test_rollback_restores_the_previous_predictions(learned):
    s, before = learned["s"], learned["before"]
    r = s.call("POST", "/model/rollback", "annotator", ok=False, json={"version": 1})
    assert r.status_code == 403  # reviewers only
    r = s.call("POST", "/model/rollback", ok=False, json={"version": 7})
    assert r.status_code == 404 and "never served" in r.json()["error"]
    out = s.call("POST", "/model/rollback", json={"version": 1})
    assert out["served"] == 1 and out["retired"] == [2] and out["predicting"] == 0
    model = s.wait(s.idle)
    assert {v["version"]: v["status"] for v in model["versions"]} == {1: "served", 2: "retired"}
    assert model["updates"][-1]["kind"] == "rollback" and model["updates"][-1]["user"] == "reviewer"
    now = {"seg": s.tiles(), "conf": s.tiles("confidence")}
    human = {(0, 0), (2, 2), (3, 3)}  # edited: their labels are the humans'
    for tile, data in before["seg"].items():
        if tile not in human:
            assert now["seg"][tile] == data, tile
    assert now["conf"] == before["conf"]
    versions = zarr.open_array(s.store / "tiles/model_version", mode="r")[...]
    assert (versions == 1).all()
    assert not (s.repo / "segloop_unet" / "2").exists()  # the newest numeric = served
    assert (s.repo / "segloop_unet" / "retired" / "2" / "model.onnx").exists()
    r = s.call("POST", "/model/rollback", ok=False, json={"version": 1})
    assert r.status_code == 409  # already served


def test_a_worse_version_is_not_served(base_store, tmp_path):
    """A destructive learning rate makes a model worse than its parent: it is kept aside
    (``rejected/``), the served version and every tile stay as they were."""
    s = Session(base_store, tmp_path, "--every", "1", *FAST, "--learn-lr", "0.9")
    try:
        before = s.tiles()
        s.call("PUT", "/review/1/1", json={"state": "accepted"})
        model = s.wait(lambda m: len(m["versions"]) == 2 and s.idle(m))
        assert model["served"]["version"] == 1
        v2 = model["versions"][1]
        assert v2["status"] == "rejected" and "parent" in v2["why"]
        assert (s.repo / "segloop_unet" / "rejected" / "2" / "model.onnx").exists()
        assert not (s.repo / "segloop_unet" / "2").exists()
        assert s.tiles() == before
        assert model["updates"] == []
    finally:
        s.stop()


def test_killing_the_learner_mid_finetune_keeps_the_last_good_version(base_store, tmp_path):
    s = Session(base_store, tmp_path, "--every", "1", *ENDLESS)
    try:
        before = s.tiles()
        s.call("PUT", "/review/1/1", json={"state": "accepted"})
        model = s.wait(lambda m: (m["round"] or {}).get("state") == "training")
        os.kill(model["round"]["pid"], signal.SIGKILL)
        model = s.wait(lambda m: s.idle(m) and len(m["versions"]) == 2)
        assert model["served"]["version"] == 1
        assert model["versions"][1]["status"] == "failed"
        assert not (s.repo / "segloop_unet" / "2").exists()
        assert s.tiles() == before
        assert requests.get(s.server.base + "/api/health", timeout=10).status_code == 200
        # and the next verdict starts a new round (that one is not killed: stop the test)
        s.call("PUT", "/review/1/2", json={"state": "accepted"})
        s.wait(lambda m: (m["round"] or {}).get("state") == "training")
    finally:
        s.stop()


def test_serve_learn_refuses_bad_settings(base_store, tmp_path):
    store = tmp_path / "slide.zarr"
    shutil.copytree(base_store, store)
    proc = run_cli("serve", store, "--learn", "--every", "0")
    assert_user_error(proc, "--every")
    proc = run_cli("serve", store, "--learn", "--runtime", "triton")
    assert_user_error(proc, "--url")
    proc = run_cli("serve", store, "--runtime", "triton", "--url", "x:1")
    assert_user_error(proc, "--learn")
    proc = run_cli("serve", store, "--learn", "--model-repository", tmp_path / "none")
    assert_user_error(proc, "--model-repository")
    repo = fresh_repository(tmp_path)  # its newest (v2) is not what the store shows (v1)
    shutil.copytree(repo / "segloop_unet" / "1", repo / "segloop_unet" / "2")
    proc = run_cli("serve", store, "--learn", "--model-repository", repo)
    assert_user_error(proc, "newest", "v2", "v1")


def test_trusted_annotators_proposals_train_weighted_by_their_agreement(base_store, tmp_path):
    """An annotator whose work reviewers kept (agreement ≥ 0.9 on 3 tiles) has a pending
    proposal trained on, weighted by that agreement; before, it was kept out."""
    from segloop.learn.trust import training_set
    from segloop.review.image import ReviewImage

    s = Session(base_store, tmp_path, "--every", "100")  # no round: the rule alone
    try:
        for tile in [(1, 1), (1, 2), (2, 1)]:
            s.stroke(*tile, 2, who="annotator")
            y, x = tile[0] * TILE + 200, tile[1] * TILE + 200  # the reviewer's touch-up
            body = {"op": "brush", "points": [[x, y], [x + 4, y]], "radius": 3, "label": 1}
            s.call("POST", "/edits", json=body)
            s.call("PUT", f"/review/{tile[0]}/{tile[1]}", json={"state": "corrected"})
        s.stroke(4, 4, 2, who="annotator")  # pending, on a tile no reviewer saw
        agreement = s.call("GET", "/stats")["agreement"]
    finally:
        s.stop()
    img = ReviewImage(s.store, "slide")
    try:
        trusted = training_set(img)
    finally:
        img.close()
    mean = np.mean([t["mean_iou"] for t in agreement["per_tile"]])
    assert agreement["tiles"] == 3 and mean >= 0.9
    assert trusted.annotators["annotator"]["trusted"]
    assert trusted.tiles[(4, 4)] == pytest.approx(mean, abs=1e-3)
    assert all(trusted.tiles[t] == 1.0 for t in [(1, 1), (1, 2), (2, 1)])


def test_a_killed_server_takes_its_learner_and_restarts_clean(base_store, tmp_path):
    """SIGKILL the server mid-round: its learner dies with it; a version a round had
    published but the server never recorded is set aside on restart, never served."""
    import psutil

    s = Session(base_store, tmp_path, "--every", "1", *ENDLESS)
    s.call("PUT", "/review/1/1", json={"state": "accepted"})
    learner = psutil.Process(s.wait(lambda m: (m["round"] or {}).get("state") == "training")[
        "round"
    ]["pid"])  # fmt: skip
    s.server.stop(signal.SIGKILL)
    learner.wait(timeout=60)  # PR_SET_PDEATHSIG: no orphan learner left training
    shutil.copytree(s.repo / "segloop_unet" / "1", s.repo / "segloop_unet" / "2")  # a lost v2
    env = {**os.environ, "SEGLOOP_MODEL_REPOSITORY": str(s.repo)}
    s.server = Server(s.store, env=env, args=("--learn", *FAST))
    try:
        assert "set segloop_unet v2 aside" in s.server.stderr_text()
        model = s.call("GET", "/model")
        assert model["served"]["version"] == 1 and model["round"] is None
        assert {v["version"]: v["status"] for v in model["versions"]}[2] == "failed"
        assert (s.repo / "segloop_unet" / "rejected" / "2").is_dir()
        # the verdict it was counting is gone with it: a reviewer starts a round by hand
        assert s.call("POST", "/model/learn", "annotator", ok=False).status_code == 403
        assert s.call("POST", "/model/learn")["started"]
        model = s.wait(lambda m: s.idle(m) and m["served"]["version"] == 3)
        assert model["versions"][-1]["trained_on"] == 1  # (1, 1), accepted before the kill
    finally:
        s.stop()


def test_an_added_model_learns_too(slide, tmp_path):
    """`serve --learn` on a store segmented by a network no one here trained (`model add`,
    5 classes, BGR input, ImageNet normalisation): one verdict starts a round that
    fine-tunes its stored graph (``model.onnx_torch``), serves version 2 of that model and
    re-predicts the tiles nobody reviewed with it."""
    import torch

    from segloop.model.add import add_model
    from tests.test_model_add import MODELS, _export

    factory, cin, options = MODELS["strided5"]
    torch.manual_seed(0)
    net = factory()
    with torch.no_grad():  # confident: a random net's near-ties would flip at any step
        net.head.weight.mul_(30)
        net.head.bias.mul_(30)
    source = _export(net, cin, tmp_path / "strided5.onnx")
    repo = tmp_path / "repository"
    v1 = add_model(source, "strided5", repo=repo, **{**options, "mpp": None})
    base = tmp_path / "base" / "slide.zarr"
    proc = run_cli("segment", slide[0], "-o", base, "--model", v1, "--tile", str(TILE), "--quiet")
    assert proc.returncode == 0, proc.stderr
    s = Session(base, tmp_path / "learn", "--every", "1", *FAST, repo=repo)
    try:
        before = s.tiles("confidence")
        s.stroke(0, 0, 4)
        s.call("PUT", "/review/0/0", json={"state": "corrected"})
        model = s.wait(lambda m: len(m["versions"]) == 2 and s.idle(m))
        v2 = model["versions"][1]
        assert v2["status"] == "served" and v2["parent"] == 1, v2
        card = read_card(repo / "strided5" / "2" / "model.onnx")
        assert card["name"] == "strided5" and card["parent_version"] == 1
        assert card["classes"] == ["bg", "a", "b", "c", "d"] and card["training"]["replay"] == 0
        after = s.tiles("confidence")
        changed = {k for k in before if before[k] != after[k]}
        assert changed and (0, 0) not in changed  # re-predicted, the reviewed tile kept
    finally:
        s.stop()

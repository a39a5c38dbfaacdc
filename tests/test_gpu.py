"""Every stage on each device: the ``cuda`` cases carry the ``gpu`` marker (``pytest -m gpu``, the
tests a reviewer runs first on a GPU machine) and skip without CUDA; the ``cpu`` cases run the same
code in the normal suite. Tiny backbone, the 60-item demo catalog."""
import json
import logging
import shutil
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np
import pytest
import torch

from conftest import TINY
from retrieval.net.checkpoint import load_checkpoint
from retrieval.cli import main as cli
from retrieval.train.config import EARLY_LEARNING

CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                          reason="no CUDA device")])
DEVICES = ["cpu", CUDA]
ON = [a for a in TINY if a not in ("--device", "cpu")]  # TINY without its device


def train(catalog, out, device, *extra):
    return cli(["train", "--catalog", str(catalog), "--out", str(out), *ON, "--device", device, *extra])


@pytest.fixture(scope="module", params=DEVICES)
def device_run(request, demo_catalog, tmp_path_factory):
    """(device, run dir) of a one-epoch cached-mode run on that device."""
    run = tmp_path_factory.mktemp(f"run-{request.param}")
    assert train(demo_catalog, run, request.param, "--epochs", "1", "--trainable-blocks", "0") == 0
    return request.param, run


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blocks", ["all", "2", "0"])
def test_one_epoch_in_each_input_mode(demo_catalog, tmp_path, device, blocks):
    # all = images mode (bf16 autocast and channels-last on CUDA); 2 = the last two units trained
    # from cached activations; 0 = everything cached
    assert train(demo_catalog, tmp_path / "run", device, "--epochs", "1", "--trainable-blocks", blocks) == 0
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["input_mode"] == ("images" if blocks == "all" else "cached")
    assert all(torch.isfinite(t.float()).all() for t in ckpt["model"].values())
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert np.isfinite(history[0]["train_loss"]) and history[0]["val_accuracy"]


@pytest.mark.parametrize("device", DEVICES)
def test_default_trains_a_small_catalogue_on_the_frozen_trunk(demo_catalog, tmp_path, device, caplog):
    # --trainable-blocks auto: frozen trunk on the CPU, and on a GPU below FULL_TUNING_MIN_ITEMS
    caplog.set_level(logging.INFO, logger="retrieval.train.trainer")
    assert train(demo_catalog, tmp_path / "run", device, "--epochs", "1") == 0
    assert load_checkpoint(tmp_path / "run" / "last.pt")["input_mode"] == "cached"
    assert ("the trunk stays frozen for" in caplog.text) == (device == "cuda")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blocks", ["all", "0"])
def test_early_learning_then_filling_on_the_device(demo_catalog, tmp_path, device, blocks, monkeypatch, caplog):
    # auto's second run (early learning, forced) keeps a target per training item on the device and
    # gathers them per batch; the filling predicts the missing training labels there (both input modes)
    import retrieval.train.trainer as trainer

    monkeypatch.setattr(trainer, "memorising", lambda *a: "forced")
    monkeypatch.setattr(trainer, "AUTO_MIN_VALIDATION", 0)  # the demo catalog's few validation items
    caplog.set_level(logging.INFO, logger="retrieval.train.trainer")
    run = tmp_path / "run"
    assert train(demo_catalog, run, device, "--epochs", "2", "--trainable-blocks", blocks,
                 "--fill-missing", "auto") == 0
    assert f"training again from the start with --early-learning {EARLY_LEARNING:g}" in caplog.text
    assert "filled in (" in caplog.text
    last = load_checkpoint(run / "last.pt")
    assert last["input_mode"] == ("images" if blocks == "all" else "cached")
    assert all(torch.isfinite(t.float()).all() for t in last["model"].values())
    assert sum(int((f >= 0).sum()) for f in last["filled_labels"].values()) > 0
    assert all(t.device.type == "cpu" for t in last.get("early_learning", {}).values())  # saved device-free
    history = json.loads((run / "metrics.json").read_text())
    assert len(history) == 2 and all(np.isfinite(h["train_loss"]) for h in history)


@pytest.mark.parametrize("device", DEVICES)
def test_the_catalogue_passes_fold_batch_norms_on_the_device(device):
    # the cache pass and embed run folded units; on CUDA (TF32 convolutions) the fold's check had
    # failed on every trunk, so nothing was folded there
    from retrieval.net.backbones import create_trunk, fold_batchnorm

    units = create_trunk("efficientnet_lite0", weights="none").eval().to(device).units
    folded = fold_batchnorm(units)
    assert folded is not units and not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert next(folded.parameters()).device.type == device


def test_resume_on_the_device(demo_catalog, device_run, tmp_path):
    device = device_run[0]
    run = tmp_path / "resumed"
    shutil.copytree(device_run[1], run)
    assert train(demo_catalog, run, device, "--epochs", "2", "--trainable-blocks", "0", "--resume") == 0
    assert load_checkpoint(run / "last.pt")["epoch"] == 1


def test_embed_predict_and_evaluate_on_the_device(demo_catalog, device_run, tmp_path, capsys):
    device, run = device_run
    emb = tmp_path / "emb.h5"
    assert cli(["embed", "--checkpoint", str(run / "best.pt"), "--catalog", str(demo_catalog), "--out", str(emb),
                "--device", device, "--workers", "0"]) == 0
    reference = tmp_path / "emb-cpu.h5"
    assert cli(["embed", "--checkpoint", str(run / "best.pt"), "--catalog", str(demo_catalog),
                "--out", str(reference), "--device", "cpu", "--workers", "0"]) == 0
    with h5py.File(emb) as a, h5py.File(reference) as b:
        cosine = (a["vectors"][:] * b["vectors"][:]).sum(1)
    assert cosine.min() > 0.99  # bf16 autocast on CUDA, float32 on the CPU
    image = sorted((demo_catalog / "images").glob("*.jpg"))[0]
    capsys.readouterr()
    assert cli(["predict", "--checkpoint", str(run / "best.pt"), str(image), "--json", "--device", device]) == 0
    assert set(json.loads(capsys.readouterr().out)[0]["labels"]) >= {"category", "colours"}
    reports = {}
    for where in (device, "cpu"):
        out = tmp_path / f"report-{where}"
        assert cli(["evaluate", "--embeddings", str(emb), "--catalog", str(demo_catalog), "--out", str(out),
                    "--device", where]) == 0
        reports[where] = json.loads((out / "report.json").read_text())
    for view in ("map_paper", "map_standard"):
        assert reports[device]["mean"][view] == pytest.approx(reports["cpu"]["mean"][view], abs=1e-6)
        assert reports[device]["mean"]["group_view"][view] == pytest.approx(
            reports["cpu"]["mean"]["group_view"][view], abs=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_on_the_device_equals_the_cpu(device):
    from retrieval.evaluate.metrics import evaluate_retrieval, topk_neighbors

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    _, on_device = topk_neighbors(x, 10, block_size=64, device=device)
    _, on_cpu = topk_neighbors(x, 10, block_size=64, device="cpu")
    assert (on_device == on_cpu).mean() > 0.999
    labels = {"g": [(str(i % 7),) for i in range(300)]}
    a = evaluate_retrieval(x, labels, k=20, device=device)
    b = evaluate_retrieval(x, labels, k=20, device="cpu")
    assert a["views"]["shared"]["map_paper"] == pytest.approx(b["views"]["shared"]["map_paper"], abs=1e-6)
    # integer vectors (exact scores, many ties), partly labelled groups and a group view: on a GPU every
    # ranked block is worked on there (metrics.Ranked), on the CPU in numpy; the same APs
    tied = rng.integers(-1, 2, (600, 4)).astype(np.float32)
    labels = {"half": [(str(i % 3),) if i % 2 else () for i in range(600)],
              "rare": [(str(i % 2),) if i % 9 == 0 else () for i in range(600)],
              "all": [(str(i % 5),) for i in range(600)]}
    views = {"half": tied[:, :2] + 2, "rare": tied[:, 2:]}
    a, b = (evaluate_retrieval(tied, labels, k=10, vectors_by_group=views, device=d, block_size=128)
            for d in (device, "cpu"))
    for g in labels:
        mine, cpu = a["groups"][g], b["groups"][g]
        assert mine["queries"] == cpu["queries"] > 0
        for got, want in [(mine, cpu)] + ([(mine["group_view"], cpu["group_view"])] if g in views else []):
            for key in ("map_paper", "map_standard"):
                assert got[key] == pytest.approx(want[key], abs=1e-12)


def test_serve_answers_a_photo_search_on_the_device(demo_catalog, device_run, tmp_path):
    from web import create_app
    from web_fixtures import build_index, make_config, photo_bytes

    device, run = device_run
    emb = tmp_path / "emb.h5"
    assert cli(["embed", "--checkpoint", str(run / "best.pt"), "--catalog", str(demo_catalog), "--out", str(emb),
                "--device", device, "--workers", "0"]) == 0
    build_index(emb, demo_catalog, tmp_path / "index")
    data = {"index": tmp_path / "index", "catalog": demo_catalog, "checkpoint": run / "best.pt"}
    app = create_app(make_config(data, tmp_path, DEVICE=device))
    image = sorted((demo_catalog / "images").glob("*.jpg"))[0]
    import io
    response = app.test_client().post("/api/search", data={"image": (io.BytesIO(photo_bytes(image)), "q.jpg"),
                                                           "k": "5"}, content_type="multipart/form-data")
    body = response.get_json()
    assert response.status_code == 200, body
    assert len(body["results"]) == 5 and body["predicted"]["category"]


@pytest.mark.parametrize("device", DEVICES)
def test_index_searched_from_many_threads(device):
    # the web server searches from several threads; FAISS GPU indexes are not thread-safe (a lock)
    import faiss

    from indexer import IndexStore, build_index

    if device == "cuda" and faiss.get_num_gpus() == 0:
        pytest.skip("faiss-gpu is not installed (or sees no GPU): CPU FAISS is used, covered by the cpu case")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(len(x))
    index = build_index(x, ids, "flat", use_gpu=device == "cuda")
    store = IndexStore({"shared": index}, ids, [f"{i}.jpg" for i in ids], use_gpu=device == "cuda")
    expected = IndexStore({"shared": index}, ids, [f"{i}.jpg" for i in ids], use_gpu=False).search(x[:200], 10)[1]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: store.search(x[i:i + 1], 10)[1][0], range(200)))
    assert (np.stack(results) == expected).mean() > 0.99
    if device == "cuda":
        assert store._gpu  # the shared view's GPU copy

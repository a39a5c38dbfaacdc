"""The group views' prior (retrieval/data/cooccurrence.py): what the other heads say of a group,
through the training labels' co-occurrence, mixed in where the validation items choose it."""
import json
import shutil
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch

from retrieval.cli import main as cli
from retrieval.data import cooccurrence
from retrieval.data.cooccurrence import apply_prior, label_cooccurrence, prior_from_state, prior_state
from retrieval.train.loop import fit_strengths


def item(**labels):
    return SimpleNamespace(labels={g: (v,) if v else () for g, v in labels.items()})


VOCAB = {"kind": ["a0", "a1"], "season": ["b0", "b1"]}


def test_cooccurrence_counts_the_items_labelled_in_both_plus_one_in_every_cell():
    items = [item(kind="a0", season="b0"), item(kind="a0", season="b0"), item(kind="a1", season="b1"),
             item(kind="a0", season="b1"), item(kind=None, season="b0")]  # the last has no kind: not counted
    c = label_cooccurrence(items, VOCAB, ["kind", "season"])
    # P(season | kind): a0 -> (2+1, 1+1) / 5, a1 -> (0+1, 1+1) / 3
    assert np.allclose(c["season"]["kind"], [[3 / 5, 2 / 5], [1 / 3, 2 / 3]])
    # P(kind | season): b0 -> (2+1, 0+1) / 4, b1 -> (1+1, 1+1) / 4
    assert np.allclose(c["kind"]["season"], [[3 / 4, 1 / 4], [1 / 2, 1 / 2]])
    assert label_cooccurrence(items, VOCAB, ["kind"]) == {}  # one group: nothing to say of it


def test_a_pair_too_large_is_left_out(monkeypatch):
    monkeypatch.setattr(cooccurrence, "MAX_CELLS", 3)  # 2 x 2 labels: 4 cells
    assert label_cooccurrence([item(kind="a0", season="b0")], VOCAB, ["kind", "season"]) == {}


def test_the_prior_mixes_its_groups_with_what_the_others_say():
    c = np.array([[0.6, 0.4], [1 / 3, 2 / 3]], dtype=np.float32)  # P(season | kind)
    probs = {"kind": np.array([[1.0, 0.0], [0.0, 1.0]], np.float32),
             "season": np.array([[0.5, 0.5], [0.5, 0.5]], np.float32)}
    prior = {"strength": {"season": 0.05}, "sources": {"season": {"kind": c}}}
    mixed = apply_prior(probs, prior)
    # 0.95 x (0.5, 0.5) + 0.05 x (0.6, 0.4), and 0.05 x (1/3, 2/3)
    assert np.allclose(mixed["season"], [[0.505, 0.495], [0.95 * 0.5 + 0.05 / 3, 0.95 * 0.5 + 0.1 / 3]])
    assert mixed["kind"] is probs["kind"]  # a group without a prior is as given
    assert apply_prior(probs, {})["season"] is probs["season"]
    # the group view: the mixed probabilities (a softmax group), the others as before
    from retrieval.data.embfile import group_vectors
    assert np.allclose(group_vectors(probs, (), prior=prior)["season"], mixed["season"])


def test_the_strength_is_chosen_where_it_orders_the_validation_items_better():
    """A head that says the same for every item (its largest class) ranks its group view by chance; a
    kind head that is right, and labels where the season follows the kind, order them: the season's
    view takes the prior. The kind's own head is right already: mixing in the season's (which says
    nothing) cannot do better, so it keeps none."""
    kinds = ["a0", "a1"] * 10
    labels = {"kind": [(k,) for k in kinds], "season": [("b0",) if k == "a0" else ("b1",) for k in kinds]}
    probs = {"kind": np.array([[1.0, 0.0] if k == "a0" else [0.0, 1.0] for k in kinds], np.float32),
             "season": np.tile(np.array([[0.9, 0.1]], np.float32), (20, 1))}
    training = [item(kind=k, season="b0" if k == "a0" else "b1") for k in kinds]
    c = label_cooccurrence(training, VOCAB, ["kind", "season"])
    assert fit_strengths(probs, labels, c) == {"season": 0.05}
    assert fit_strengths({g: p[:2] for g, p in probs.items()}, labels, c) == {}  # too few items to tell


def test_a_checkpoint_keeps_the_prior_as_tensors_and_reads_it_back(tmp_path):
    c = label_cooccurrence([item(kind="a0", season="b1")], VOCAB, ["kind", "season"])
    state = prior_state({"season": 0.05}, c)
    assert list(state["sources"]) == ["season"]  # only the chosen groups' matrices
    torch.save({"group_view_prior": state}, tmp_path / "c.pt")
    back = prior_from_state(torch.load(tmp_path / "c.pt", weights_only=True)["group_view_prior"])
    assert back["strength"] == {"season": 0.05}
    assert np.allclose(back["sources"]["season"]["kind"], c["season"]["kind"])
    assert prior_from_state(None) == {} and prior_from_state({"strength": {}}) == {}


@pytest.fixture(scope="module")
def prior_run(tiny_run, tmp_path_factory):
    """The tiny run's best.pt with a prior on two of the demo catalog's single-label groups."""
    run = tmp_path_factory.mktemp("prior-run")
    shutil.copy(tiny_run / "best.pt", run / "best.pt")
    ckpt = torch.load(run / "best.pt", weights_only=True)
    vocab = ckpt["model_config"]["groups"]
    rng = np.random.default_rng(0)

    def conditional(h, g):
        m = rng.random((len(vocab[h]), len(vocab[g]))).astype(np.float32)
        return m / m.sum(1, keepdims=True)

    ckpt["group_view_prior"] = prior_state({"pattern": 0.05, "sleeve": 0.05},
                                           {"pattern": {"category": conditional("category", "pattern")},
                                            "sleeve": {"category": conditional("category", "sleeve"),
                                                       "gender": conditional("gender", "sleeve")}})
    torch.save(ckpt, run / "best.pt")
    return run


def test_embed_and_search_by_photo_mix_the_group_views_as_the_checkpoint_says(prior_run, demo_catalog, tmp_path):
    from retrieval.net.checkpoint import load_model
    from web.search import Query

    out = tmp_path / "emb.h5"
    assert cli(["embed", "--checkpoint", str(prior_run / "best.pt"), "--catalog", str(demo_catalog), "--out",
                str(out), "--device", "cpu", "--workers", "0", "--batch-size", "16"]) == 0
    model, _ = load_model(prior_run / "best.pt")
    assert model.group_view_prior["strength"] == {"pattern": 0.05, "sleeve": 0.05}
    with h5py.File(out) as f:
        assert json.loads(f.attrs["group_view_prior"]) == {"pattern": 0.05, "sleeve": 0.05}
        probs = {g: f[f"probs/{g}"][:] for g in f["probs"]}
        views = {g: f[f"groups/{g}"][:] for g in f["groups"]}
    told = probs["category"] @ model.group_view_prior["sources"]["pattern"]["category"]
    assert np.allclose(views["pattern"], 0.95 * probs["pattern"] + 0.05 * told, atol=1e-6)
    assert not np.allclose(views["pattern"], probs["pattern"], atol=1e-4)
    assert np.allclose(views["category"], probs["category"])  # no prior: its own head's
    # a photo's group vector is made as the index's rows are: with the model's prior, from every head
    query = Query(embedding=np.ones((1, 4), np.float32), probs={g: p[:1] for g, p in probs.items()},
                  sigmoid_groups=tuple(model.sigmoid_groups), predicted={}, labels={}, thumbnail=b"",
                  own_shared_view="matches", group_view_prior=model.group_view_prior)
    for g in ("pattern", "sleeve", "category"):
        assert np.allclose(query.vector(f"group-{g}", "matches", 0.5), views[g][:1], atol=1e-6)


def test_training_keeps_the_chosen_strengths_with_their_matrices(demo_catalog, tmp_path, monkeypatch):
    """Each validation fits the strengths on the validation items (here: pattern chosen) and best.pt
    keeps them with the matrices of those groups alone, counted on the training items."""
    from conftest import TINY
    from retrieval.data.catalog import read_catalog
    from retrieval.net.checkpoint import load_model
    from retrieval.train import loop
    from retrieval.train.config import split_validation

    seen = {}

    def fit(probs, labels, cooc):
        seen.update(groups=set(cooc), n=len(next(iter(probs.values()))), labelled=len(labels["pattern"]))
        return {"pattern": 0.05}

    monkeypatch.setattr(loop, "fit_strengths", fit)
    run = tmp_path / "run"
    assert cli(["train", "--catalog", str(demo_catalog), "--out", str(run), "--epochs", "1", *TINY]) == 0
    catalog = read_catalog(demo_catalog)
    single = [g for g in catalog.groups if g not in catalog.multi_label_groups()]
    train, val = split_validation(catalog.split_items("train"), 0.1)
    assert seen == {"groups": set(single), "n": len(val), "labelled": len(val)}
    model, ckpt = load_model(run / "best.pt")
    assert model.group_view_prior["strength"] == {"pattern": 0.05}
    expected = label_cooccurrence(train, catalog.vocab, single)["pattern"]
    assert set(model.group_view_prior["sources"]["pattern"]) == set(expected)
    for h, c in expected.items():
        assert np.allclose(model.group_view_prior["sources"]["pattern"][h], c)
    history = json.loads((run / "metrics.json").read_text())
    records = history["history"] if isinstance(history, dict) else history
    assert records[-1]["group_view_prior"] == {"pattern": 0.05}

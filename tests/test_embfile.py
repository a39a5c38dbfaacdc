"""EMB.h5 through its one module: sigmoid-scored groups are recorded, and fused scores follow the
same group-vector rule as the model's own outputs."""
import json

import h5py
import numpy as np
import pytest
from conftest import TINY

from retrieval.cli import main as cli
from retrieval.data.embfile import (Embeddings, EmbeddingsError, embedding_part, fuse_probabilities,
                                    group_spread_weights, group_vectors, ranks_by_cosine, read_embeddings, shared_vectors, shared_view_name,
                                    shared_view_rows)


def test_group_vector_rule_hand_worked():
    probs = {"type": np.array([[0.6, 0.4]]), "colour": np.array([[0.3, 0.4]])}
    vectors = group_vectors(probs, ["colour"])
    assert np.allclose(vectors["type"], [[0.6, 0.4]])  # softmax kept: p·q = P(same label)
    # sigmoids over their length to the power 1/2: (0.3, 0.4) / sqrt(0.5)
    assert np.allclose(vectors["colour"], [[0.3 / 0.5 ** 0.5, 0.4 / 0.5 ** 0.5]])
    assert np.allclose(group_vectors(probs, ["colour"], power=1.0)["colour"], [[0.6, 0.8]])  # the cosine's unit length
    assert np.allclose(group_vectors(probs, ["colour"], power=0.0)["colour"], [[0.3, 0.4]])  # as they are
    assert np.allclose(fuse_probabilities(probs, {g: 1 - p for g, p in probs.items()})["type"], [[0.5, 0.5]])
    with pytest.raises(ValueError, match="groups or label vocabularies differ"):
        fuse_probabilities(probs, {"type": probs["type"]})


def test_shared_view_with_groups_hand_worked():
    embedding = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    probs = {"type": np.array([[1.0, 0.0], [1.0, 0.0]]), "colour": np.array([[0.3, 0.4], [0.0, 0.5]])}
    joined = shared_vectors(embedding, probs, ["colour"])
    # [e, type / sqrt 2, colour (unit length: 0.6, 0.8 and 0, 1) / sqrt 2], each row over
    # sqrt(1 + (1 + 1) / 2) = sqrt 2, two zero columns making 8
    assert np.allclose(joined[0], np.array([1, 0, 1, 0, 0.6, 0.8, 0, 0]) / np.sqrt(2)
                       * [1, 1, 2 ** -0.5, 2 ** -0.5, 2 ** -0.5, 2 ** -0.5, 1, 1])
    # items orthogonal in the embedding are now alike through their shared type and half their colour:
    # (0 + (1 + 0.8) / 2) / 2 = 0.45
    assert joined[0] @ joined[1] == pytest.approx(0.45)
    assert shared_vectors(embedding, probs, ["colour"], "embedding") is embedding
    assert shared_vectors(embedding, {}) is embedding
    with pytest.raises(EmbeddingsError, match="Unknown shared view 'groups'"):
        shared_vectors(embedding, probs, ["colour"], "groups")
    # the embedding alone comes back from the file's vectors
    stored = Embeddings(joined, np.arange(2), ["a", "b"], attrs={"shared_view": "with-groups", "embedding_dim": 2})
    assert np.allclose(embedding_part(stored), embedding)
    with pytest.raises(EmbeddingsError, match="embedding_dim"):
        embedding_part(Embeddings(joined, np.arange(2), ["a", "b"], attrs={"shared_view": "with-groups"}))
    older = Embeddings(embedding, np.arange(2), ["a", "b"])  # written before the option: the embedding alone
    assert embedding_part(older) is embedding
    # reading a file's shared view: as stored, or its embedding alone, and the name of what comes back
    assert shared_view_rows(joined, stored.attrs, "file") is joined
    assert np.allclose(shared_view_rows(joined[1:], stored.attrs, "embedding"), [[0, 1]])
    assert shared_view_name(stored.attrs) == "with-groups" and shared_view_name(stored.attrs, "embedding") == "embedding"
    assert shared_view_name({}) == "embedding"  # an older file holds the embedding alone
    with pytest.raises(EmbeddingsError, match="Unknown shared view 'groups'"):
        shared_view_rows(joined, stored.attrs, "groups")


def test_shared_view_matches_hand_worked():
    # the embedding at weight 1/2 (unit length first), then every group's probabilities as they are
    # (sigmoids too) over sqrt(G), not normalised: e·e'/4 + mean_g p_g·p'_g
    embedding = np.array([[2.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
    probs = {"type": np.array([[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]]),
             "colour": np.array([[0.9, 0.9, 0.0], [0.8, 0.0, 0.1], [0.0, 0.0, 1.0]])}
    joined = shared_vectors(embedding, probs, ["colour"], "matches")
    assert joined.shape == (3, 8)  # 2 + 2 + 3 = 7 columns, one zero column
    assert np.allclose(joined[0], [0.5, 0, 0.5 / np.sqrt(2), 0.5 / np.sqrt(2), 0.9 / np.sqrt(2), 0.9 / np.sqrt(2), 0, 0])
    scores = joined @ joined.T
    # items 0 and 1: embeddings orthogonal; type 0.5 * 1 = 0.5; colour 0.9 * 0.8 = 0.72: (0.5 + 0.72) / 2
    assert scores[0, 1] == pytest.approx(0.61)
    # items 1 and 2: e·e' = 0.8, / 4 = 0.2; type 0; colour 0.1 * 1 = 0.1: 0.2 + 0.05
    assert scores[1, 2] == pytest.approx(0.25)
    # no normalisation: a sure item scores with itself above an unsure one (lengths carry the heads' certainty)
    assert scores[2, 2] == pytest.approx(0.25 + (1 + 1) / 2) and scores[0, 0] == pytest.approx(0.25 + (0.5 + 1.62) / 2)
    # items 0 and 2: e·e' = 0.6, / 4 = 0.15; type 0.5; colour 0: 0.15 + 0.25
    assert scores[0, 2] == pytest.approx(0.4)
    assert ranks_by_cosine("with-groups") and ranks_by_cosine("embedding") and not ranks_by_cosine("matches")
    stored = Embeddings(joined, np.arange(3), ["a", "b", "c"], attrs={"shared_view": "matches", "embedding_dim": 2})
    assert np.allclose(embedding_part(stored), [[1, 0], [0, 1], [0.6, 0.8]])  # the embedding alone, unit length


def test_group_spread_weights_hand_worked():
    probs = {"a": np.array([[1.0, 0], [0, 1], [1, 0]]),  # p·q over the pairs: 0, 1, 0 (sd 0.4714)
             "b": np.array([[0.5, 0.5]] * 3),  # 0.5 for every pair: cannot reorder, keeps 1
             "c": np.array([[1.0, 0], [0.5, 0.5], [0, 1]])}  # 0.5, 0, 0.5 (sd 0.2357)
    # 1 / sd: 2.1213 and 4.2426, scaled to mean 1 over the groups that vary
    assert group_spread_weights(probs) == pytest.approx({"a": 2 / 3, "b": 1.0, "c": 4 / 3}, abs=1e-6)
    assert group_spread_weights(probs, limit=2) == {}  # one pair: too few to tell
    assert group_spread_weights({"b": probs["b"]}) == {}  # nothing varies: equal weights
    # a group nearly constant among the items would take most of the weight: held at 3 x the median
    rare = np.tile([[1.0, 0.0]], (400, 1))
    rare[0] = [0.0, 1.0]  # one item of 400 differs: p·q 0 for 399 of 79,800 pairs, sd 0.0706
    weights = group_spread_weights({"a": np.tile(probs["a"], (134, 1))[:400], "c": np.tile(probs["c"], (134, 1))[:400],
                                    "rare": rare})
    assert weights["rare"] == pytest.approx(3 * weights["c"], rel=1e-4)  # c is the median group
    assert np.mean(list(weights.values())) == pytest.approx(1.0, rel=1e-5)


def test_shared_view_matches_weighs_each_group_by_its_weight():
    # e·e'/4 + mean_g w_g p_g·p'_g: the weights multiply each group's agreement, on both sides alike
    embedding = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    probs = {"type": np.array([[1.0, 0], [1, 0], [0, 1]]), "colour": np.array([[0.0, 1], [1, 0], [0, 1]])}
    equal = shared_vectors(embedding, probs, [], "matches")
    weighted = shared_vectors(embedding, probs, [], "matches", {"type": 0.5, "colour": 1.5})
    # item 0 against 1: type agrees (1), colour not; against 2: colour agrees, embeddings equal (1/4)
    assert (equal @ equal.T)[0, 1] == pytest.approx(0.5) and (equal @ equal.T)[0, 2] == pytest.approx(0.75)
    assert (weighted @ weighted.T)[0, 1] == pytest.approx(0.25) and (weighted @ weighted.T)[0, 2] == pytest.approx(1.0)
    assert np.allclose(shared_vectors(embedding, probs, [], "matches", {"type": 1.0}), equal)  # absent: 1
    # the older views take no weights
    assert np.allclose(shared_vectors(embedding, probs, [], "with-groups", {"type": 0.5, "colour": 1.5}),
                       shared_vectors(embedding, probs, [], "with-groups"))


def test_a_fused_multi_label_method_model_ranks_as_the_model_does(demo_catalog, tmp_path):
    # the multi-label method scores every group by sigmoids; fusing a file with itself must give the
    # group view the model gave (before, fusion normalised only the catalog's multi-label groups)
    run, emb = tmp_path / "run", tmp_path / "emb.h5"
    assert cli(["train", "--catalog", str(demo_catalog), "--out", str(run), "--epochs", "1",
                "--method", "multi-label", *TINY]) == 0
    assert cli(["embed", "--checkpoint", str(run / "best.pt"), "--catalog", str(demo_catalog), "--out", str(emb),
                "--device", "cpu", "--workers", "0"]) == 0
    assert read_embeddings(emb).sigmoid_groups == ["category", "colours", "pattern", "sleeve", "gender"]
    reports = {}
    for name, extra in (("own", []), ("fused", ["--fuse", str(emb)])):
        assert cli(["evaluate", "--embeddings", str(emb), "--catalog", str(demo_catalog),
                    "--out", str(tmp_path / name), *extra]) == 0
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
    for g, entry in reports["own"]["groups"].items():
        assert reports["fused"]["groups"][g]["group_view"] == pytest.approx(entry["group_view"]), g


def test_bad_files_name_the_file_and_dataset(tmp_path):
    path = tmp_path / "short.h5"
    with h5py.File(path, "w") as f:
        f["vectors"] = np.zeros((3, 4), np.float32)
        f["ids"] = np.arange(2)
        f.create_dataset("paths", data=["a", "b", "c"], dtype=h5py.string_dtype())
    with pytest.raises(EmbeddingsError, match="short.h5: dataset 'ids' has 2 rows, 'vectors' has 3"):
        read_embeddings(path)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(EmbeddingsError, match="text.h5: cannot read the embeddings file as HDF5"):
        read_embeddings(tmp_path / "text.h5")


def test_group_names_become_hdf5_link_names_and_back():
    """'/' (HDF5's path separator), '%' and a lone '.' are escaped; every other name is its own key,
    so files written before read the same; any name comes back as it went in."""
    from hypothesis import given, strategies as st

    from retrieval.data.embfile import group_name, h5_key

    assert [h5_key(g) for g in ["colour", "Sleeve Length", "Ärmel ✓", "x.y", ".."]] == \
        ["colour", "Sleeve Length", "Ärmel ✓", "x.y", ".."]
    assert [h5_key(g) for g in ["Colour/Color", "100%", ".", "%2F"]] == ["Colour%2FColor", "100%25", "%2E", "%252F"]

    @given(st.text(min_size=1))
    def round_trip(name):
        key = h5_key(name)
        assert "/" not in key and key != "." and group_name(key) == name

    round_trip()

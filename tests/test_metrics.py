"""Tests for retrieval.evaluate.metrics: naive references and hand-worked cases."""
import itertools

import numpy as np
import pytest

from retrieval.evaluate.classification import classification_report, confusion_matrix, multilabel_report
from retrieval.evaluate.interval import draw_queries, percentile_interval, resampled_means
from retrieval.evaluate.metrics import (count_relevant, evaluate_retrieval, fetch_depth, label_matrix, map_at_k,
                                       topk_neighbors)


@pytest.fixture(params=["numpy", "torch"])
def ranked_in(request, monkeypatch):
    """Each ranked block worked on in numpy on the host (the CPU's way) or in torch on the scores'
    device (a GPU's way, run here on the CPU): the same results."""
    import retrieval.evaluate.metrics as metrics

    monkeypatch.setattr(metrics, "ON_HOST", ("cpu",) if request.param == "numpy" else ())
    return request.param


# --------------------------------------------------------------------------- naive references

def naive_topk(vectors, k):
    """Full python sort of every row: score descending, then index ascending, self excluded."""
    scores = np.asarray(vectors, dtype=np.float64) @ np.asarray(vectors, dtype=np.float64).T
    rows = []
    for q in range(len(vectors)):
        others = sorted((j for j in range(len(vectors)) if j != q), key=lambda j: (-scores[q, j], j))
        rows.append(others[:k])
    return scores, np.array(rows, dtype=np.int64).reshape(len(vectors), -1)


def naive_map(vectors, label_sets, k, queries=None, candidates="labelled"):
    """mAP@k of one group straight from the definition, one query at a time (all rows or ``queries``);
    ``candidates="labelled"`` ranks only the items labelled in the group, ``all`` every item."""
    _, ranked = naive_topk(vectors, len(vectors) - 1)
    ap_paper, ap_standard = [], []
    for q, labels in enumerate(label_sets):
        if not labels or (queries is not None and q not in queries):
            continue
        others = [j for j in ranked[q] if candidates == "all" or label_sets[j]]
        shares = [bool(set(labels) & set(label_sets[j])) for j in others]
        rel = shares[:k]
        summed = sum(sum(rel[:r + 1]) / (r + 1) for r in range(len(rel)) if rel[r])
        m_paper, m_standard = sum(rel), min(k, sum(shares))
        ap_paper.append(summed / m_paper if m_paper else 0.0)
        ap_standard.append(summed / m_standard if m_standard else 0.0)
    if not ap_paper:
        return {"map_paper": None, "map_standard": None, "queries": 0}
    return {"map_paper": np.mean(ap_paper), "map_standard": np.mean(ap_standard), "queries": len(ap_paper)}


def random_label_sets(rng, n, vocab, unlabelled=0.2, max_labels=2):
    """Random multi-label sets, some of them empty (unlabelled items)."""
    sets = []
    for _ in range(n):
        if rng.random() < unlabelled:
            sets.append(())
        else:
            size = rng.integers(1, max_labels + 1)
            sets.append(tuple(rng.choice(vocab, size=size, replace=False)))
    return sets


def dyadic_unit_vectors(rng, n, dim=8):
    """Unit vectors with entries in {0, +-0.5, +-1}: normalising and scoring them are exact in float32."""
    out = np.zeros((n, dim), dtype=np.float32)
    for i in range(n):
        if rng.random() < 0.3:
            out[i, rng.integers(dim)] = rng.choice([-1.0, 1.0])
        else:
            out[i, rng.choice(dim, 4, replace=False)] = rng.choice([-0.5, 0.5], size=4)
    return out


def assert_map_equal(got, want):
    assert got["queries"] == want["queries"]
    for key in ("map_paper", "map_standard"):
        if want[key] is None:
            assert got[key] is None
        else:
            assert got[key] == pytest.approx(want[key], abs=1e-12)


# --------------------------------------------------------------------------- topk_neighbors

@pytest.fixture(scope="module")
def tied_vectors():
    """Integer vectors in {-1, 0, 1}^3 (only 7 possible scores per pair) and their full naive ranking."""
    vectors = np.random.default_rng(0).integers(-1, 2, size=(300, 3)).astype(np.float32)
    return vectors, *naive_topk(vectors, 299)


@pytest.mark.parametrize("k, block_size", [(1, 7), (5, 64), (50, 7), (50, 1024), (299, 64), (400, 1024)])
def test_topk_matches_full_sort_with_many_ties(tied_vectors, k, block_size):
    # Nearly every top-k boundary falls inside a run of tied scores.
    vectors, full, ranking = tied_vectors
    want = ranking[:, :k]
    scores, indices = topk_neighbors(vectors, k, block_size=block_size)
    assert indices.shape == (300, min(k, 299))
    np.testing.assert_array_equal(indices, want)
    np.testing.assert_array_equal(scores, np.take_along_axis(full, want, axis=1))


@pytest.mark.parametrize("k", [1, 5, 50, 298])
def test_topk_ids_on_the_device_order_as_on_the_host(tied_vectors, k):
    # the GPU's ordering (two stable sorts on the device) against the host's (numpy), many ties
    import torch

    from retrieval.evaluate.neighbours import _topk_fixed_at_boundary, row_scores, topk_ids, topk_scores

    x = torch.as_tensor(tied_vectors[0])
    for rows in (torch.arange(0, 64), torch.arange(250, 300)):
        scores = row_scores(x, rows)
        np.testing.assert_array_equal(topk_ids(scores.clone(), k).numpy(), topk_scores(scores, k)[1])
        np.testing.assert_array_equal(topk_ids(scores.clone(), k).numpy(), tied_vectors[2][rows.numpy(), :k])
        # the tied rows fixed 7 at a time give the same sets as all at once
        for a, b in zip(_topk_fixed_at_boundary(scores, k), _topk_fixed_at_boundary(scores, k, cells=7 * 300)):
            assert torch.equal(a, b)


def test_topk_identical_vectors_follow_row_order():
    # All six vectors identical: every score is 1, so the neighbours are the lowest other ids.
    vectors = np.ones((6, 4), dtype=np.float32) / 2
    _, indices = topk_neighbors(vectors, 3, block_size=2)
    assert indices[0].tolist() == [1, 2, 3]
    assert indices[2].tolist() == [0, 1, 3]
    assert indices[5].tolist() == [0, 1, 2]


def test_topk_tie_straddling_the_boundary():
    # 1-D vectors [1, 1, 1, 1, 2]: for row 0 the scores are 1, 1, 1, 2 (rows 1..4); k = 2 keeps
    # row 4 (score 2) then the lowest-id of the tied rows 1, 2, 3, i.e. row 1.
    vectors = np.array([[1], [1], [1], [1], [2]], dtype=np.float32)
    scores, indices = topk_neighbors(vectors, 2, block_size=3)
    assert indices[0].tolist() == [4, 1]
    assert scores[0].tolist() == [2.0, 1.0]
    assert indices[4].tolist() == [0, 1]
    # [1, 2, 3, 1, 1]: row 0 scores 2, 3, 1, 1 for rows 1..4; k = 3 -> rows 2 (3), 1 (2), then 3 (1, lower id
    # than 4). The boundary fix collects rows 1, 2 in id order, so they must be re-sorted by score.
    vectors = np.array([[1], [2], [3], [1], [1]], dtype=np.float32)
    scores, indices = topk_neighbors(vectors, 3)
    assert indices[0].tolist() == [2, 1, 3]
    assert scores[0].tolist() == [3.0, 2.0, 1.0]


def test_topk_random_float_vectors():
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((120, 16)).astype(np.float32)
    _, want = naive_topk(vectors, 10)
    _, indices = topk_neighbors(vectors, 10, block_size=50)
    # Float rounding may swap near-equal neighbours; compare as sets with a tiny tolerance budget.
    agree = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(indices, want)])
    assert agree > 0.99


def test_topk_degenerate_sizes():
    assert topk_neighbors(np.ones((1, 3)), 5)[1].shape == (1, 0)
    with pytest.raises(ValueError, match="NaN"):
        topk_neighbors(np.array([[1.0], [np.nan]]), 1)


# --------------------------------------------------------------------------- labels and counts

def test_label_matrix_multi_hot():
    y = label_matrix([("b",), ("a", "c"), ()], ["a", "b", "c"])
    assert y.tolist() == [[False, True, False], [True, False, True], [False, False, False]]
    with pytest.raises(ValueError, match="'z'"):
        label_matrix([("z",)], ["a"])


@pytest.mark.parametrize("n_classes", [5, 70])
def test_count_relevant_matches_brute_force(n_classes):
    rng = np.random.default_rng(2)
    vocab = [f"c{i}" for i in range(n_classes)]
    sets = random_label_sets(rng, 200, vocab, max_labels=3)
    got = count_relevant(label_matrix(sets, vocab), block_size=16)
    want = [sum(bool(set(s) & set(t)) for j, t in enumerate(sets) if j != i) for i, s in enumerate(sets)]
    assert got.tolist() == want


# --------------------------------------------------------------------------- mAP against the reference

@pytest.mark.parametrize("k", [1, 3, 10, 50, 500])
@pytest.mark.parametrize("n_classes", [4, 70])
def test_map_matches_naive_reference(k, n_classes):
    # Small integer vectors keep every score exact, so ties are real ties in both implementations.
    rng = np.random.default_rng(k + n_classes)
    vectors = rng.integers(-2, 3, size=(150, 4)).astype(np.float32)
    vocab = [f"l{i}" for i in range(n_classes)]
    sets = random_label_sets(rng, 150, vocab, max_labels=3 if n_classes > 4 else 2)
    _, neighbors = topk_neighbors(vectors, k, block_size=32)
    got = map_at_k(neighbors, label_matrix(sets, vocab), k)  # neighbours among every row
    assert_map_equal(got, naive_map(vectors, sets, k, candidates="all"))


@pytest.mark.parametrize("candidates", ["labelled", "all"])
def test_evaluate_retrieval_matches_reference_for_both_views(candidates, ranked_in):
    rng = np.random.default_rng(3)
    shared, own = dyadic_unit_vectors(rng, 90), dyadic_unit_vectors(rng, 90, dim=6)
    labels = {"colour": random_label_sets(rng, 90, ["red", "blue", "green"]),
              "style": random_label_sets(rng, 90, ["a", "b", "c", "d", "e"], unlabelled=0.5),
              "fit": random_label_sets(rng, 90, ["slim", "loose"], unlabelled=0.0),
              "rare": [("x",)] + [()] * 88 + [("x",)], "once": [()] * 89 + [("y",)]}  # 2 and 1 candidates
    got = evaluate_retrieval(shared, labels, k=20, vectors_by_group={"style": own}, block_size=16,
                             candidates=candidates)
    for g, sets in labels.items():
        assert_map_equal(got["groups"][g], naive_map(shared, sets, 20, candidates=candidates))
    want_view = naive_map(own, labels["style"], 20, candidates=candidates)
    assert got["groups"]["style"]["group_view"]["map_paper"] == pytest.approx(want_view["map_paper"], abs=1e-12)
    assert "group_view" not in got["groups"]["colour"]
    # "rare": its two labelled items share "x", so with labelled candidates any ranking scores 1 there
    assert got["groups"]["rare"].get("uninformative", False) == (candidates == "labelled")
    counted = [g for g in labels if not (g == "rare" and candidates == "labelled")]
    shared_mean = np.mean([got["groups"][g]["map_paper"] for g in counted])
    assert got["mean"]["map_paper"] == pytest.approx(shared_mean)
    assert got["views"]["shared"]["groups"] == counted
    assert got["views"]["group"]["groups"] == ["style"]
    assert got["mean"]["group_view"]["map_standard"] == pytest.approx(want_view["map_standard"])


def test_partially_labelled_groups_take_every_path_of_the_labelled_ranking(ranked_in):
    # k = 5 among 600 rows. "half" (labelled on half the rows) and "far" find their labelled
    # neighbours in one top-56 of all rows (fetch_depth); "far"'s 20 labelled rows in cluster A
    # have the highest ids there, so ties put them last and some of them find fewer than 5
    # labelled rows in that top-56: those rows rank their masked scores. "tenth" (60 rows) is
    # too rare for a top-80 (16 x k) and masks its scores, as does "few" (8 rows). In each group's
    # own view (its only group) the masked block is ranked directly.
    # Integer vectors make every score exact, with many ties (broken by id).
    assert (fetch_depth(5, 0.5, 600), fetch_depth(5, 0.1, 600), fetch_depth(5, 8 / 600, 600)) == (56, None, None)
    rng = np.random.default_rng(6)
    own = np.zeros((600, 4), np.float32)
    own[:300, 0], own[300:, 3] = 3, 3
    own[:, 1:3] = rng.integers(-1, 2, (600, 2))
    vocab = ["a", "b", "c"]
    pick = lambda rows: [tuple(rng.choice(vocab, 1)) if i in rows else () for i in range(600)]  # noqa: E731
    labels = {"half": pick(set(rng.choice(600, 300, replace=False).tolist())),
              "far": pick(set(range(280, 300)) | set(range(300, 580))),
              "tenth": pick(set(rng.choice(600, 60, replace=False).tolist())),
              "few": pick(set(rng.choice(600, 8, replace=False).tolist()))}
    _, ranked = naive_topk(own, 56)
    assert min(sum(bool(labels["far"][j]) for j in ranked[q]) for q in range(280, 300)) < 5
    shared = dyadic_unit_vectors(rng, 600)
    got = evaluate_retrieval(shared, labels, k=5, vectors_by_group={g: own for g in labels}, block_size=64)
    for g, sets in labels.items():
        assert_map_equal(got["groups"][g], naive_map(shared, sets, 5))
        want = naive_map(own, sets, 5)
        assert got["groups"][g]["group_view"] == {"map_paper": pytest.approx(want["map_paper"], abs=1e-12),
                                                  "map_standard": pytest.approx(want["map_standard"], abs=1e-12)}


@pytest.mark.parametrize("block_size", [1, 7, None])
def test_sampled_queries_rank_every_candidate(block_size, ranked_in):
    rng = np.random.default_rng(4)
    shared, own = dyadic_unit_vectors(rng, 80), dyadic_unit_vectors(rng, 80, dim=5)
    labels = {"colour": random_label_sets(rng, 80, ["red", "blue", "green"]),
              "style": random_label_sets(rng, 80, ["a", "b", "c"], unlabelled=0.6)}
    got = evaluate_retrieval(shared, labels, k=10, vectors_by_group={"style": own}, block_size=block_size,
                             sample_queries=25, seed=3)
    sample = set(draw_queries(80, 25, seed=3).tolist())
    assert len(sample) == 25
    for g, sets in labels.items():
        assert_map_equal({key: got["groups"][g][key] for key in ("map_paper", "map_standard", "queries")},
                         naive_map(shared, sets, 10, sample))  # each group's labelled items, sampled or not
        low, high = got["groups"][g]["ci95"]["map_paper"]
        assert low <= got["groups"][g]["map_paper"] <= high
    want_view = naive_map(own, labels["style"], 10, sample)
    assert got["groups"]["style"]["group_view"]["map_standard"] == pytest.approx(want_view["map_standard"], abs=1e-12)
    assert len(got["groups"]["style"]["group_view"]["ci95"]["map_standard"]) == 2
    low, high = got["views"]["shared"]["ci95"]["map_paper"]
    assert low <= got["views"]["shared"]["map_paper"] <= high
    assert "ci95" in got["views"]["group"]
    again = evaluate_retrieval(shared, labels, k=10, vectors_by_group={"style": own}, sample_queries=25, seed=3)
    assert again["groups"] == got["groups"]  # seeded: the same sample and the same intervals


def test_sample_of_every_query_equals_the_full_evaluation():
    rng = np.random.default_rng(5)
    vectors = dyadic_unit_vectors(rng, 60)
    labels = {"colour": random_label_sets(rng, 60, ["red", "blue", "green"])}
    full, sampled = evaluate_retrieval(vectors, labels, k=5), evaluate_retrieval(vectors, labels, k=5, sample_queries=500)
    assert sampled["groups"]["colour"]["map_paper"] == full["groups"]["colour"]["map_paper"]
    assert "ci95" not in full["groups"]["colour"] and "ci95" in sampled["groups"]["colour"]
    with pytest.raises(ValueError, match="at least 1 query"):
        evaluate_retrieval(vectors, labels, k=5, sample_queries=0)


def test_bootstrap_of_hand_worked_series():
    # Constant APs have a zero-width interval; a series none of whose queries a resample drew is
    # NaN there. Four queries with APs 0, 0, 1, 1: every resampled mean is a multiple of 1/4.
    reps = resampled_means({"flat": (np.array([0, 1, 2]), np.full(3, 0.5)),
                            "half": (np.arange(4), np.array([0.0, 0.0, 1.0, 1.0]))}, n=4, seed=0, resamples=400)
    assert percentile_interval(reps["flat"]) == [0.5, 0.5]
    assert set(np.unique(reps["half"] * 4)) <= {0, 1, 2, 3, 4} and 0.45 < reps["half"].mean() < 0.55
    low, high = percentile_interval(reps["half"])
    assert 0 <= low < 0.5 < high <= 1
    one = resampled_means({"rare": (np.array([3]), np.array([1.0]))}, n=4, seed=0, resamples=200)["rare"]
    assert np.isnan(one).any() and set(one[~np.isnan(one)]) == {1.0}  # (3/4)^4 = 32% of resamples miss it
    assert percentile_interval(np.full(5, np.nan)) is None


# --------------------------------------------------------------------------- hand-worked mAP cases

# Five 2-D unit vectors; "type" labels, k = 3:
#   item  vector  type     colour
#   0     (1,0)   {a}      {red}
#   1     (1,0)   {b}      {blue}
#   2     (1,0)   {a,b}    {green}
#   3     (0,1)   {}       {}        <- unlabelled: never a query, never relevant
#   4     (0,1)   {a}      {}
# Items 0, 1, 2 score 1 against each other and 0 against 3, 4; items 3, 4 score 1 together.
HAND_VECTORS = np.array([[1, 0], [1, 0], [1, 0], [0, 1], [0, 1]], dtype=np.float32)
HAND_TYPE = [("a",), ("b",), ("a", "b"), (), ("a",)]
HAND_COLOUR = [("red",), ("blue",), ("green",), (), ()]


def test_hand_worked_ties_overlap_and_unlabelled():
    # q0 {a}:   ranking 1, 2 (tie, by id), 3, 4 -> top3 [1, 2, 3], rel [0, 1, 0]; sum P(r)rel = 1/2.
    #           paper M = 1 -> 0.5; relevant in set = {2, 4} = 2 -> standard 0.5 / 2 = 0.25.
    # q1 {b}:   top3 [0, 2, 3], rel [0, 1, 0] -> 1/2; paper 0.5; relevant {2} -> standard 0.5.
    # q2 {a,b}: top3 [0, 1, 3], rel [1, 1, 0] -> 1 + 1 = 2; paper 2/2 = 1; relevant {0, 1, 4} -> 2/3.
    # q3:       unlabelled, skipped.
    # q4 {a}:   ranking 3 (score 1), then 0, 1, 2 (score 0, by id) -> top3 [3, 0, 1], rel [0, 1, 0]:
    #           1/2; paper 0.5; relevant {0, 2} -> standard 0.25.
    # mAP paper = (0.5 + 0.5 + 1 + 0.5) / 4 = 0.625; standard = (0.25 + 0.5 + 2/3 + 0.25) / 4 = 5/12.
    _, neighbors = topk_neighbors(HAND_VECTORS, 3)
    got = map_at_k(neighbors, label_matrix(HAND_TYPE, ["a", "b"]), 3)
    assert got == {"map_paper": pytest.approx(0.625), "map_standard": pytest.approx(5 / 12), "queries": 4}


def test_hand_worked_candidates_are_the_labelled_items(ranked_in):
    # Query = candidate: item 3, unlabelled in "type", is neither a query nor a candidate there.
    # q0 {a}:   candidates 1, 2 (score 1, by id), 4 (score 0) -> rel [0, 1, 1]: 1/2 + 2/3 = 7/6;
    #           paper M = 2 -> 7/12; relevant {2, 4} -> standard 7/12.
    # q1 {b}:   [0, 2, 4] rel [0, 1, 0] -> 1/2; M = 1 both ways -> 1/2.
    # q2 {a,b}: [0, 1, 4] rel [1, 1, 1] -> 3; M = 3 both ways -> 1.
    # q4 {a}:   [0, 1, 2] (all score 0, by id) rel [1, 0, 1] -> 1 + 2/3 = 5/3; M = 2 -> 5/6.
    # mAP = (7/12 + 1/2 + 1 + 5/6) / 4 = 35/48 for both variants; with every candidate
    # (``all``, item 3 a miss) it is test_hand_worked_ties_overlap_and_unlabelled's 0.625 / 5/12.
    got = evaluate_retrieval(HAND_VECTORS, {"type": HAND_TYPE}, k=3)
    assert got["groups"]["type"] == {"map_paper": pytest.approx(35 / 48), "map_standard": pytest.approx(35 / 48),
                                     "queries": 4}
    old = evaluate_retrieval(HAND_VECTORS, {"type": HAND_TYPE}, k=3, candidates="all")
    assert old["groups"]["type"] == {"map_paper": pytest.approx(0.625), "map_standard": pytest.approx(5 / 12),
                                     "queries": 4}
    with pytest.raises(ValueError, match="candidates"):
        evaluate_retrieval(HAND_VECTORS, {"type": HAND_TYPE}, k=3, candidates="some")


def test_hand_worked_k_larger_than_set():
    # k = 10 > N - 1 = 4, so every other item is retrieved:
    # q0: [1, 2, 3, 4] rel [0, 1, 0, 1] -> 1/2 + 2/4 = 1; M = 2 both ways -> 0.5
    # q1: [0, 2, 3, 4] rel [0, 1, 0, 0] -> 1/2; M = 1 -> 0.5
    # q2: [0, 1, 3, 4] rel [1, 1, 0, 1] -> 1 + 1 + 3/4 = 2.75; M = 3 -> 11/12
    # q4: [3, 0, 1, 2] rel [0, 1, 0, 1] -> 1/2 + 2/4 = 1; M = 2 -> 0.5
    # mAP = (0.5 + 0.5 + 11/12 + 0.5) / 4 = 29/48 for both variants.
    _, neighbors = topk_neighbors(HAND_VECTORS, 10)
    assert neighbors.shape == (5, 4)
    got = map_at_k(neighbors, label_matrix(HAND_TYPE, ["a", "b"]), 10)
    assert got == {"map_paper": pytest.approx(29 / 48), "map_standard": pytest.approx(29 / 48), "queries": 4}


def test_hand_worked_no_relevant_items(ranked_in):
    # Every colour is unique, so no query has a relevant item: AP = 0, three queries (3, 4 unlabelled);
    # every ranking scores 0, so the group is marked and left out of the means (type's alone, 35/48)
    got = evaluate_retrieval(HAND_VECTORS, {"colour": HAND_COLOUR, "type": HAND_TYPE}, k=3)
    assert got["groups"]["colour"] == {"map_paper": 0.0, "map_standard": 0.0, "queries": 3, "uninformative": True}
    assert got["views"]["shared"]["groups"] == ["type"] and got["mean"]["map_paper"] == pytest.approx(35 / 48)
    every = evaluate_retrieval(HAND_VECTORS, {"colour": HAND_COLOUR}, k=3, candidates="all")
    assert every["groups"]["colour"]["uninformative"] is True  # the unlabelled are misses: still no hit


def test_group_without_labels_is_left_out_of_the_mean(ranked_in):
    got = evaluate_retrieval(HAND_VECTORS, {"type": HAND_TYPE, "empty": [()] * 5}, k=3)
    assert got["groups"]["empty"] == {"map_paper": None, "map_standard": None, "queries": 0}
    assert got["mean"]["map_paper"] == pytest.approx(35 / 48)
    assert got["views"]["shared"]["groups"] == ["type"]


def test_group_that_every_item_shares_is_left_out_of_the_means(ranked_in):
    # "gender" is 'w' on every labelled item (one unlabelled): every ranking gives AP 1, so it is
    # kept in the report, marked, and the means are type's alone (35/48, as above). "season" has a
    # label every item shares beside others ("all" on each): also uninformative. Ranked with
    # candidates="all", the unlabelled item is a miss, so gender counts again.
    labels = {"type": HAND_TYPE, "gender": [("w",), ("w",), (), ("w",), ("w",)],
              "season": [("all", "s"), ("all",), ("all", "w"), ("all",), ("all", "s")]}
    views = {g: np.eye(5, dtype=np.float32)[:, :3] for g in labels}
    got = evaluate_retrieval(HAND_VECTORS, labels, k=3, vectors_by_group=views)
    for g in ("gender", "season"):
        assert got["groups"][g]["uninformative"] is True
        assert got["groups"][g]["map_paper"] == 1.0 and got["groups"][g]["group_view"]["map_paper"] == 1.0
    assert "uninformative" not in got["groups"]["type"]
    assert got["mean"]["map_paper"] == pytest.approx(35 / 48)
    assert got["views"]["shared"]["groups"] == got["views"]["group"]["groups"] == ["type"]
    every = evaluate_retrieval(HAND_VECTORS, labels, k=3, candidates="all")
    assert "uninformative" not in every["groups"]["gender"] and every["groups"]["season"]["uninformative"]
    assert every["views"]["shared"]["groups"] == ["type", "gender"]


# --------------------------------------------------------------------------- classification

def test_confusion_matrix_and_single_label_report():
    # true [0,0,0,1,1,2], pred [0,0,1,1,2,2]; class 3 never occurs nor is predicted.
    #   rows = true: 0 -> [2,1,0,0]; 1 -> [0,1,1,0]; 2 -> [0,0,1,0]; 3 -> [0,0,0,0]
    # class 0: P = 2/2, R = 2/3, F1 = 0.8; class 1: P = 1/2, R = 1/2, F1 = 0.5;
    # class 2: P = 1/2, R = 1/1, F1 = 2/3; class 3 excluded from macro.
    # accuracy = 4/6; macro-F1 = (0.8 + 0.5 + 2/3) / 3 = 59/90.
    y_true, y_pred = [0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2]
    cm = confusion_matrix(y_true, y_pred, 4)
    assert cm.tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    report = classification_report(y_true, y_pred, ["t", "u", "v", "w"])
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["macro_f1"] == pytest.approx(59 / 90)
    assert report["classes"]["t"] == {"precision": 1.0, "recall": pytest.approx(2 / 3),
                                      "f1": pytest.approx(0.8), "support": 3}
    assert report["classes"]["v"]["f1"] == pytest.approx(2 / 3)
    assert report["classes"]["w"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_predicted_class_without_support_counts_in_macro():
    # true [0,0], pred [0,1]: class 0 P = 1, R = 1/2, F1 = 2/3; class 1 predicted once, never true:
    # P = 0, R = 0/0 -> 0, F1 = 0. macro-F1 = (2/3 + 0) / 2 = 1/3; accuracy 1/2.
    report = classification_report([0, 0], [0, 1], ["x", "y"])
    assert report["macro_f1"] == pytest.approx(1 / 3)
    assert report["accuracy"] == 0.5
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix([0, 2], [0, 0], 2)


def test_multilabel_report():
    # classes x, y, z
    # true [[1,1,0],[0,1,0],[0,0,0],[1,0,1]]; pred [[1,0,0],[0,1,0],[0,0,0],[1,1,1]]
    # x: tp 2, pred 2, true 2 -> 1/1/1; y: tp 1 (row 1), pred 2, true 2 -> 0.5/0.5/0.5; z: 1/1/1
    # macro-F1 = 2.5/3 = 5/6; exact match rows 1, 2 -> 0.5;
    # sample accuracy = (1/2 + 1/1 + 1 (both empty) + 2/3) / 4 = 19/24.
    y_true = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 0], [1, 0, 1]], dtype=bool)
    y_pred = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 1, 1]], dtype=bool)
    report = multilabel_report(y_true, y_pred, ["x", "y", "z"])
    assert report["macro_f1"] == pytest.approx(5 / 6)
    assert report["exact_match"] == 0.5
    assert report["sample_accuracy"] == pytest.approx(19 / 24)
    assert report["classes"]["y"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert list(itertools.islice(report["classes"], 3)) == ["x", "y", "z"]


def test_shared_view_ranked_by_inner_product_when_not_normalised():
    # the "matches" shared view is an inner product of vectors whose lengths count (embfile.shared_vectors)
    # colour: item 0 red, item 1 red|blue, item 2 green; k = 2
    vectors = np.array([[1.0, 0.0], [2.0, 2.0], [0.9, 0.2]], dtype=np.float32)
    labels = {"colour": [("red",), ("red", "blue"), ("green",)]}
    # q0: inner products 2 (item 1), 0.9 (item 2): rel 10 -> AP 1; cosines 0.71, 0.98: rel 01 -> 1/2.
    # q1: 2.2 (item 2) before 2 (item 0), cosines 0.84 before 0.71 alike: rel 01 -> 1/2. q2: nothing relevant -> 0.
    plain = evaluate_retrieval(vectors, labels, k=2, normalise=False)
    cosine = evaluate_retrieval(vectors, labels, k=2)
    assert plain["groups"]["colour"]["map_paper"] == pytest.approx((1 + 1 / 2 + 0) / 3)
    assert cosine["groups"]["colour"]["map_paper"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)

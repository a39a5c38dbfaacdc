"""Tests for the ``retrieval evaluate`` command on a tiny hand-built catalog."""
import json

import h5py
import numpy as np
import pytest
from PIL import Image

from retrieval.data.catalog import read_catalog
from retrieval.commands.evaluate import main
from retrieval.evaluate.report import (EvaluationError, compare_reports, evaluate_embeddings, format_table, write_report)

E1, E2, E3 = np.eye(3, dtype=np.float32)

# Items 0-7 are test, 8-11 train; item 7's image was skipped by the embedder.
#   item  shared  type-view  type   colour
#   0     e1      e1         shirt  red
#   1     e1      e1         shirt  blue
#   2     e1      e2         dress  red|blue
#   3     e2      e2         dress  red
#   4     e2      e3         -      blue
#   5     e2      e1         shirt  green
#   6     e3      e2         dress  green
#   7     (skipped)          shirt  red
#   8-11  e1      e1         shirt  red     (train: would change every number if included)
ROWS = [("shirt", "red", E1, E1), ("shirt", "blue", E1, E1), ("dress", "red|blue", E1, E2),
        ("dress", "red", E2, E2), ("", "blue", E2, E3), ("shirt", "green", E2, E1),
        ("dress", "green", E3, E2), ("shirt", "red", None, None)] + [("shirt", "red", E1, E1)] * 4


@pytest.fixture
def catalog_dir(tmp_path):
    root = tmp_path / "catalog"
    (root / "img").mkdir(parents=True)
    lines = ["image,split,title,type,colour"]
    for i, (kind, colour, _, _) in enumerate(ROWS):
        Image.new("RGB", (4, 4), (20 * i, 0, 0)).save(root / "img" / f"{i:02d}.png")
        lines.append(f"img/{i:02d}.png,{'test' if i < 8 else 'train'},item {i},{kind},{colour}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def write_embeddings(path, rows, paths=None, fingerprint="sha-test"):
    """An EMB.h5 as docs/formats.md describes, with a group-focused view of 'type'."""
    kept = [i for i, row in enumerate(rows) if row[2] is not None]
    with h5py.File(path, "w") as f:
        f.create_dataset("vectors", data=np.stack([rows[i][2] for i in kept]))
        f.create_dataset("ids", data=np.array(kept, dtype=np.int64))
        f.create_dataset("paths", data=paths or [f"img/{i:02d}.png" for i in kept], dtype=h5py.string_dtype())
        f.create_dataset("groups/type", data=np.stack([rows[i][3] for i in kept]))
        f.attrs.update({"fingerprint": fingerprint, "backbone": "test", "dimension": 3,
                        "created": "2024-01-01T00:00:00Z", "groups": json.dumps(["type"]),
                        "skipped": json.dumps([f"img/{i:02d}.png" for i, r in enumerate(rows) if r[2] is None])})
    return path


# Hand-worked, k = 3, test split = items 0-6 (scores are 1 within {0,1,2} and {3,4,5}, else 0):
# type   item 4 unlabelled: neither a query nor a candidate (query = candidate) -> 6 queries.
#        q0 [1,2,3] rel 100 -> paper 1, std 1/2 (shirts 1, 5); q1 [0,2,3] same -> 1, 1/2;
#        q2 [0,1,3] rel 001 -> 1/3, 1/6; q3 [5,0,1] rel 000 -> 0, 0; q5 [3,0,1] rel 011 -> 1/2+2/3 = 7/6,
#        M 2 -> 7/12 both; q6 [0,1,2] rel 001 -> 1/3, 1/6.
#        paper (1+1+1/3+0+7/12+1/3)/6 = 13/24; standard (1/2+1/2+1/6+0+7/12+1/6)/6 = 23/72.
#        With --candidates all, item 4 is a miss: q3 [4,5,0] rel 000, q5 [3,4,0] rel 001 -> 1/3, 1/6:
#        paper (1+1+1/3+0+1/3+1/3)/6 = 1/2; standard (1/2+1/2+1/6+0+1/6+1/6)/6 = 1/4.
# colour q0 red [1,2,3] rel 011 -> 1/2+2/3 = 7/6, M 2 -> 7/12 both; q1 blue [0,2,3] rel 010 -> 1/2, std 1/4;
#        q2 red|blue [0,1,3] rel 111 -> 1, 1; q3 red [4,5,0] rel 001 -> 1/3, 1/6; q4, q5, q6 -> 0.
#        paper (7/12+1/2+1+1/3)/7 = 29/84; standard (7/12+1/4+1+1/6)/7 = 2/7.
# type group view: every query's two same-type items come first -> 1, 1.
EXPECTED = {"type": (13 / 24, 23 / 72, 6), "colour": (29 / 84, 2 / 7, 7)}


def test_shared_view_embedding_ranks_by_the_embedding_part(catalog_dir, tmp_path):
    # a with-groups file: each vector is the embedding followed by other columns (here a strong
    # parity pattern that reorders every ranking), the whole L2-normalised
    emb = write_embeddings(tmp_path / "emb.h5", [
        row if row[2] is None else (*row[:2], np.concatenate([row[2], 5 * np.eye(2)[i % 2]]), row[3])
        for i, row in enumerate(ROWS)])
    with h5py.File(emb, "r+") as f:
        v = f["vectors"][:]
        f["vectors"][...] = v / np.linalg.norm(v, axis=1, keepdims=True)
        f.attrs.update({"shared_view": "with-groups", "embedding_dim": 3, "dimension": 5})
    catalog = read_catalog(catalog_dir, check_files=False)
    alone = evaluate_embeddings(emb, catalog, k=3, shared_view="embedding")
    assert alone["settings"]["shared_view"] == "embedding"
    for g, (paper, standard, _) in EXPECTED.items():  # as the plain embedding ranks (the test above)
        assert alone["groups"][g]["map_paper"] == pytest.approx(paper)
        assert alone["groups"][g]["map_standard"] == pytest.approx(standard)
    whole = evaluate_embeddings(emb, catalog, k=3)
    assert whole["settings"]["shared_view"] == "with-groups"
    assert whole["groups"]["type"]["map_paper"] != pytest.approx(EXPECTED["type"][0])
    with h5py.File(emb, "r+") as f:
        del f.attrs["embedding_dim"]
    with pytest.raises(EvaluationError, match="emb.h5.*embedding_dim"):
        evaluate_embeddings(emb, catalog, k=3, shared_view="embedding")


def test_evaluate_writes_hand_checked_report(catalog_dir, tmp_path, capsys):
    emb = write_embeddings(tmp_path / "emb.h5", ROWS)
    assert main(["--embeddings", str(emb), "--catalog", str(catalog_dir), "--k", "3", "--device", "cpu"]) == 0
    out_dir = tmp_path / "emb-report"
    assert {p.name for p in out_dir.iterdir()} == {"report.json", "table.md", "chart.png"}
    report = json.loads((out_dir / "report.json").read_text())
    assert report["settings"] | {"embeddings": None, "catalog": None} == {
        "split": "test", "k": 3, "fingerprint": "sha-test", "embeddings": None, "n_items": 7,
        "n_missing": 1, "candidates": "labelled", "catalog": None, "title": "emb", "fused_with": None,
        "shared_view": "embedding", "multi_label_view_power": None}  # no multi-label group in the file
    for g, (paper, standard, queries) in EXPECTED.items():
        assert report["groups"][g]["map_paper"] == pytest.approx(paper)
        assert report["groups"][g]["map_standard"] == pytest.approx(standard)
        assert report["groups"][g]["queries"] == queries
    assert report["groups"]["type"]["group_view"] == {"map_paper": pytest.approx(1.0),
                                                      "map_standard": pytest.approx(1.0)}
    assert "group_view" not in report["groups"]["colour"]
    assert report["mean"]["map_paper"] == pytest.approx((13 / 24 + 29 / 84) / 2)
    assert report["mean"]["map_standard"] == pytest.approx((23 / 72 + 2 / 7) / 2)
    assert report["views"]["group"] == {"map_paper": pytest.approx(1.0), "map_standard": pytest.approx(1.0),
                                        "groups": ["type"]}
    printed = capsys.readouterr().out
    assert "| type | 6 | 54.2 / 31.9 | 100.0 / 100.0 |" in printed
    assert printed.strip() == (out_dir / "table.md").read_text().strip()
    assert (out_dir / "chart.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["--embeddings", str(emb), "--catalog", str(catalog_dir), "--k", "3", "--candidates", "all",
                 "--out", str(tmp_path / "all")]) == 0
    report = json.loads((tmp_path / "all" / "report.json").read_text())
    assert report["settings"]["candidates"] == "all"
    assert (report["groups"]["type"]["map_paper"], report["groups"]["type"]["map_standard"]) == (
        pytest.approx(1 / 2), pytest.approx(1 / 4))
    assert report["groups"]["colour"]["map_paper"] == pytest.approx(29 / 84)  # every item labelled: the same


def test_group_of_one_label_is_shown_but_left_out_of_the_mean(catalog_dir, tmp_path, capsys, caplog):
    # Every item is "women": any ranking scores 100 there, so the means stay those of the hand-worked
    # type and colour, and the table says why the group is not in them.
    labels = catalog_dir / "labels.csv"
    lines = labels.read_text().splitlines()
    labels.write_text("\n".join([lines[0] + ",gender"] + [line + ",women" for line in lines[1:]]) + "\n")
    emb = write_embeddings(tmp_path / "emb.h5", ROWS)
    assert main(["--embeddings", str(emb), "--catalog", str(catalog_dir), "--k", "3", "--out", str(tmp_path / "r")]) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["groups"]["gender"] == {"map_paper": 1.0, "map_standard": 1.0, "queries": 7, "uninformative": True}
    assert report["mean"]["map_paper"] == pytest.approx((13 / 24 + 29 / 84) / 2)
    assert report["views"]["shared"]["groups"] == ["type", "colour"]
    assert "| gender (one label shared by all: not in the mean) | 7 | 100.0 / 100.0 |" in capsys.readouterr().out
    assert "group 'gender': one label shared by all in split 'test'" in caplog.text
    # a label of its own on every item (a brand): any ranking scores 0, and the table says that
    labels.write_text("\n".join([lines[0] + ",brand"] + [line + f",b{i}" for i, line in enumerate(lines[1:])]) + "\n")
    assert main(["--embeddings", str(emb), "--catalog", str(catalog_dir), "--k", "3", "--out", str(tmp_path / "b")]) == 0
    assert "| brand (no label shared by two: not in the mean) | 7 | 0.0 / 0.0 | – |" in capsys.readouterr().out
    assert "group 'brand': no label shared by two in split 'test'" in caplog.text


def test_split_all_includes_train_items(catalog_dir, tmp_path):
    emb = write_embeddings(tmp_path / "emb.h5", ROWS)
    report = evaluate_embeddings(emb, read_catalog(catalog_dir), split="all", k=3)
    assert report["settings"]["n_items"] == 11
    assert report["groups"]["type"]["queries"] == 10


def test_compare_prints_both_runs(catalog_dir, tmp_path, capsys):
    emb = write_embeddings(tmp_path / "emb.h5", ROWS)
    for name, k in (("run-a", "3"), ("run-b", "2")):
        main(["--embeddings", str(emb), "--catalog", str(catalog_dir), "--k", k, "--out", str(tmp_path / name)])
    capsys.readouterr()
    assert main(["--compare", str(tmp_path / "run-a"), str(tmp_path / "run-b")]) == 0
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if line.startswith("| group"))
    assert header == "| group | run-a | run-a (group view) | run-b | run-b (group view) |"
    assert "| type | 54.2 / 31.9 | 100.0 / 100.0 |" in table
    assert "| **mean** |" in table
    assert table == compare_reports([tmp_path / "run-a", tmp_path / "run-b"]) + "\n"


def test_path_missing_from_catalog_is_a_clear_error(catalog_dir, tmp_path, capsys):
    paths = [f"img/{i:02d}.png" for i in range(7)] + ["img/ghost.png"] + [f"img/{i:02d}.png" for i in range(9, 12)]
    emb = write_embeddings(tmp_path / "emb.h5", ROWS, paths=paths)
    with pytest.raises(EvaluationError, match="img/ghost.png"):
        evaluate_embeddings(emb, read_catalog(catalog_dir))
    with pytest.raises(SystemExit) as exit_info:
        main(["--embeddings", str(emb), "--catalog", str(catalog_dir)])
    assert exit_info.value.code == 2
    assert "not in the catalog" in capsys.readouterr().err


def test_a_bad_class_chart_or_an_empty_split_is_told_before_evaluating(catalog_dir, tmp_path, capsys):
    # --class-chart of no group ran the whole evaluation and wrote the report, then failed; an empty
    # split suggested itself among "test, val, train, all"
    emb = write_embeddings(tmp_path / "emb.h5", ROWS)
    with pytest.raises(SystemExit):
        main(["--embeddings", str(emb), "--catalog", str(catalog_dir), "--class-chart", "nope",
              "--out", str(tmp_path / "r")])
    assert "--class-chart 'nope': no such group; choose one of: type, colour" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit):
        main(["--embeddings", str(emb), "--catalog", str(catalog_dir), "--split", "val"])
    assert ("only 0 embedded item(s) in split 'val'; choose another split: test (8 items), train (4 items), or all"
            in capsys.readouterr().err)


def test_a_report_is_replaced_as_a_whole(catalog_dir, tmp_path, monkeypatch):
    # report.json and table.md were renamed into place before the chart was drawn: a run killed then left
    # the new report beside the old chart (and a reader saw the mix while the chart was drawn)
    import retrieval.evaluate.report as report_module

    emb = write_embeddings(tmp_path / "emb.h5", ROWS)
    out = tmp_path / "r"
    assert main(["--embeddings", str(emb), "--catalog", str(catalog_dir), "--k", "3", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def killed(report, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(report_module, "draw_chart", killed)
    with pytest.raises(KeyboardInterrupt):
        main(["--embeddings", str(emb), "--catalog", str(catalog_dir), "--k", "2", "--out", str(out)])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the whole report before, no temporaries


def test_compare_needs_report_directories(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--compare", str(tmp_path)])
    assert "report.json not found" in capsys.readouterr().err
    for text, message in (("{}", "is not a report of 'retrieval evaluate' (no settings, groups, mean)"),
                          ("[1, 2]", "is not a report of 'retrieval evaluate'"), ("<html>", "is not a report (Expecting")):
        (tmp_path / "report.json").write_text(text)
        with pytest.raises(SystemExit):
            main(["--compare", str(tmp_path)])
        err = capsys.readouterr().err
        assert str(tmp_path / "report.json") in err and message in err, err
    # hand-edited fields of the wrong type were an AttributeError traceback, a missing k "error: k"
    good = {"settings": {"k": 50}, "groups": {"colour": {"map_paper": 0.5, "map_standard": 0.4,
                                                         "group_view": {"map_paper": 0.6}}},
            "mean": {"map_paper": 0.5}}
    for change, message in (
            (lambda r: r["settings"].pop("k"), "settings.k is None, not a whole number"),
            (lambda r: r["groups"].update(colour="0.5"), "groups.colour is '0.5', not an object"),
            (lambda r: r["groups"]["colour"].update(group_view=[1]), "groups.colour.group_view is [1], not an object"),
            (lambda r: r["groups"]["colour"].update(map_paper="high"), "groups.colour.map_paper is 'high', not a number"),
            (lambda r: r.update(views={"shared": 3}), "views is not an object of objects")):
        report = json.loads(json.dumps(good))
        change(report)
        (tmp_path / "report.json").write_text(json.dumps(report))
        with pytest.raises(SystemExit):
            main(["--compare", str(tmp_path)])
        assert message in capsys.readouterr().err
    (tmp_path / "report.json").write_text(json.dumps(good))
    assert main(["--compare", str(tmp_path)]) == 0


def test_compare_notes_means_over_different_groups(catalog_dir, tmp_path):
    # the same embeddings, evaluated with and without a group: their means look like a gain
    emb = write_embeddings(tmp_path / "emb.h5", ROWS)
    main(["--embeddings", str(emb), "--catalog", str(catalog_dir), "--k", "3", "--out", str(tmp_path / "both")])
    report = json.loads((tmp_path / "both" / "report.json").read_text())
    assert report["views"]["shared"]["groups"] == ["type", "colour"]
    report["views"]["shared"]["groups"] = ["type"]
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "report.json").write_text(json.dumps(report))
    table = compare_reports([tmp_path / "both", tmp_path / "one"])
    assert table.endswith("The means are over different groups: both: type, colour; one: type.")
    assert "different groups" not in compare_reports([tmp_path / "both", tmp_path / "both"])


def test_compare_notes_runs_ranked_by_other_rules(catalog_dir, tmp_path):
    # an EMB.h5 embedded before the multi-label group view's rule changed, against one after: its
    # colour group view moved with no word said (the report did not record the rule)
    emb = write_embeddings(tmp_path / "emb.h5", ROWS)
    main(["--embeddings", str(emb), "--catalog", str(catalog_dir), "--k", "3", "--out", str(tmp_path / "new")])
    report = json.loads((tmp_path / "new" / "report.json").read_text())
    report["settings"]["multi_label_view_power"] = 0.5
    (tmp_path / "new" / "report.json").write_text(json.dumps(report))
    del report["settings"]["multi_label_view_power"]
    report["settings"]["shared_view"] = "matches"
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "report.json").write_text(json.dumps(report))
    table = compare_reports([tmp_path / "new", tmp_path / "old"])
    assert "The runs differ in what the shared view ranks by (shared_view): new: embedding; old: matches." in table
    assert ("the multi-label group views' rule (p·q / (|p| |q|)^power; reports before 2026-11-29 do not record it: "
            "1.0, the cosine, then) (multi_label_view_power): new: 0.5; old: not recorded.") in table
    assert "differ in" not in compare_reports([tmp_path / "new", tmp_path / "new"])
    for recorded in (None, 1.0):  # what a report before the record had: no note
        report["settings"].update(shared_view="embedding", multi_label_view_power=recorded)
        (tmp_path / "new" / "report.json").write_text(json.dumps(report))
        del report["settings"]["multi_label_view_power"]
        (tmp_path / "old" / "report.json").write_text(json.dumps(report))
        assert "differ in" not in compare_reports([tmp_path / "new", tmp_path / "old"])


def test_classification_section_is_written(catalog_dir, tmp_path):
    report = evaluate_embeddings(write_embeddings(tmp_path / "emb.h5", ROWS), read_catalog(catalog_dir), k=3)
    report["classification"] = {"type": {"accuracy": 0.75, "macro_f1": 0.5}}
    write_report(report, tmp_path / "out")
    assert "| type | 75.0 | 50.0 |" in (tmp_path / "out" / "table.md").read_text()
    assert json.loads((tmp_path / "out" / "report.json").read_text())["classification"]["type"]["accuracy"] == 0.75
    assert format_table(report).count("| type |") == 2


def test_classification_and_fusion_from_head_probabilities(tmp_path):
    """Hand-worked: 4 test items of one single-label group, two models' probabilities."""
    import h5py

    from conftest import write_catalog
    from retrieval.data.catalog import read_catalog
    from retrieval.evaluate.report import evaluate_embeddings

    root = write_catalog(tmp_path / "cat", [f"{n}.png,test,,{c},x" for n, c in
                                            [("a", "red"), ("b", "red"), ("c", "blue"), ("d", "blue")]])
    catalog = read_catalog(root)  # colour vocab: blue, red

    def write(path, probs):
        with h5py.File(path, "w") as f:
            f["vectors"] = np.eye(4, dtype=np.float32)
            f["ids"] = np.arange(4)
            f.create_dataset("paths", data=["a.png", "b.png", "c.png", "d.png"], dtype=h5py.string_dtype())
            f["probs/colour"] = np.array(probs, dtype=np.float32)
            f["groups/colour"] = np.array(probs, dtype=np.float32)
        return path

    # model A: a right (red), b wrong (says blue), c right (blue), d wrong (says red): accuracy 2/4
    a = write(tmp_path / "a.h5", [[0.2, 0.8], [0.6, 0.4], [0.9, 0.1], [0.4, 0.6]])
    # model B: a right, b right strongly, c right, d right weakly
    b = write(tmp_path / "b.h5", [[0.3, 0.7], [0.1, 0.9], [0.8, 0.2], [0.55, 0.45]])
    alone = evaluate_embeddings(a, catalog, "test", k=3)["classification"]["colour"]
    assert alone["accuracy"] == pytest.approx(0.5)
    # per class: red predicted for a, d (1 right of 2) -> P = 1/2, R = 1/2; blue likewise -> macro-F1 0.5
    assert alone["macro_f1"] == pytest.approx(0.5)
    fused = evaluate_embeddings(a, catalog, "test", k=3, fuse=b)
    # fused: a [.25,.75] red ok; b [.35,.65] red ok; c [.85,.15] blue ok; d [.475,.525] red: wrong
    assert fused["classification"]["colour"]["accuracy"] == pytest.approx(0.75)
    assert fused["settings"]["fused_with"].endswith("b.h5")
    # group view ranks by p·q of the fused probabilities (blue, red):
    #   a: b .575 (red, hit), d .5125, c .325 -> AP 1;  b: a .575 (hit), d .5075, c .395 -> AP 1
    #   c: d .4825 (blue, hit), b .395, a .325 -> AP 1; d: a .5125, b .5075, c .4825 (hit at 3) -> AP 1/3
    view = fused["groups"]["colour"]["group_view"]
    assert view["map_paper"] == pytest.approx((3 + 1 / 3) / 4)
    assert view["map_standard"] == pytest.approx((3 + 1 / 3) / 4)


def test_classification_reads_the_models_labels_when_the_catalog_changed(tmp_path, caplog):
    """Hand-worked: the model learnt (blue, green, red); the catalog now has no green and a new label,
    pink. Its columns are read by the file's head_labels, not by the catalog's (blue, pink, red)."""
    import h5py

    from conftest import write_catalog
    from retrieval.data.catalog import read_catalog
    from retrieval.evaluate.report import evaluate_embeddings

    root = write_catalog(tmp_path / "cat", [f"{n}.png,test,,{c},x" for n, c in
                                            [("a", "red"), ("b", "blue"), ("c", "pink"), ("d", "red")]])
    catalog = read_catalog(root)
    assert catalog.vocab["colour"] == ["blue", "pink", "red"]
    # columns blue, green, red: a -> red (right), b -> blue (right), c -> green (pink: no class), d -> blue (wrong)
    probs = np.array([[0.1, 0.2, 0.7], [0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4]], dtype=np.float32)
    path = tmp_path / "e.h5"
    with h5py.File(path, "w") as f:
        f["vectors"] = np.eye(4, dtype=np.float32)
        f["ids"] = np.arange(4)
        f.create_dataset("paths", data=["a.png", "b.png", "c.png", "d.png"], dtype=h5py.string_dtype())
        f["probs/colour"] = probs
        f["groups/colour"] = probs
        f.attrs["head_labels"] = json.dumps({"colour": ["blue", "green", "red"]})
    report = evaluate_embeddings(path, catalog, "test", k=3)["classification"]["colour"]
    assert report["accuracy"] == pytest.approx(0.5)
    classes = report["classes"]
    # blue: predicted b, d (1 right), support 1 -> P 1/2, R 1; red: predicted a, support a, d -> P 1, R 1/2;
    # green: predicted c, support 0 -> 0; pink: never predicted, support 1 -> 0. Macro-F1 over all four
    assert set(classes) == {"blue", "green", "red", "pink"}
    assert (classes["pink"]["support"], classes["pink"]["recall"]) == (1, 0.0)
    assert (classes["blue"]["precision"], classes["red"]["recall"]) == (0.5, 0.5)
    assert report["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0 + 0) / 4)
    assert "1 evaluated item(s) carry labels the model has no class for ('pink')" in caplog.text
    # a file that does not name its columns, whose width no longer matches the catalog: no report
    with h5py.File(path, "r+") as f:
        del f.attrs["head_labels"]
        del f["probs/colour"]
        f["probs/colour"] = np.hstack([probs, probs[:, :1]])
    assert "colour" not in evaluate_embeddings(path, catalog, "test", k=3).get("classification", {})
    assert "the embeddings hold 4 class scores, the catalog 3 labels" in caplog.text


def test_group_vectors_from_probs_scale_multi_label_groups_only():
    from retrieval.data.embfile import group_vectors as group_vectors_from_probs

    probs = {"type": np.array([[0.2, 0.8]]), "colour": np.array([[0.6, 0.8, 0.0]])}
    vectors = group_vectors_from_probs(probs, ["colour"])
    assert np.allclose(vectors["type"], [[0.2, 0.8]])  # softmax kept: p·q = P(same label)
    assert np.allclose(vectors["colour"], [[0.6, 0.8, 0.0]])  # length 1: unchanged
    # length 0.9 * sqrt 2 = 1.273 -> divided by its square root, 1.128: length sqrt(1.273) = 1.128
    assert np.allclose(np.linalg.norm(group_vectors_from_probs({"c": np.array([[0.9, 0.9]])}, ["c"])["c"]),
                       (0.9 * 2 ** 0.5) ** 0.5)


def test_multi_label_group_view_weighs_sure_labels_against_length():
    """Query (0.9, 0.9, 0); candidate X has exactly its labels but is unsure (0.5, 0.5, 0), Y is sure
    of both and of a third (0.9, 0.9, 0.9). The cosine ranks X first (1.0 against 0.816); p.q /
    sqrt(|p| |q|) ranks Y first: X 0.9 / sqrt(1.2728 * 0.7071) = 0.9487, Y 1.62 / sqrt(1.2728 * 1.5588) = 1.1501."""
    from retrieval.data.embfile import group_vectors as group_vectors_from_probs

    rows = np.array([[0.9, 0.9, 0.0], [0.5, 0.5, 0.0], [0.9, 0.9, 0.9]])
    views = group_vectors_from_probs({"c": rows}, ["c"])["c"]
    assert views[0] @ views[1] == pytest.approx(0.9487, abs=1e-4)
    assert views[0] @ views[2] == pytest.approx(1.1501, abs=1e-4)
    cosine = group_vectors_from_probs({"c": rows}, ["c"], power=1.0)["c"]
    assert cosine[0] @ cosine[1] == pytest.approx(1.0) and cosine[0] @ cosine[2] == pytest.approx(0.8165, abs=1e-4)


def test_sampled_queries_give_intervals(catalog_dir, tmp_path, capsys):
    emb = write_embeddings(tmp_path / "emb.h5", ROWS)
    # a sample as large as the split is the full evaluation, with intervals around each value
    assert main(["--embeddings", str(emb), "--catalog", str(catalog_dir), "--k", "3", "--sample-queries", "50",
                 "--out", str(tmp_path / "all")]) == 0
    report = json.loads((tmp_path / "all" / "report.json").read_text())
    assert report["settings"]["sample_queries"] == 7 and report["settings"]["seed"] == 0
    for g, (paper, standard, queries) in EXPECTED.items():
        entry = report["groups"][g]
        assert (entry["map_paper"], entry["map_standard"], entry["queries"]) == (
            pytest.approx(paper), pytest.approx(standard), queries)
        assert entry["ci95"]["map_paper"][0] <= paper <= entry["ci95"]["map_paper"][1]
    assert report["groups"]["type"]["group_view"]["ci95"]["map_paper"] == [pytest.approx(1.0)] * 2
    assert "7 sampled queries, 95% intervals" in capsys.readouterr().out
    table = (tmp_path / "all" / "table.md").read_text()
    assert "| type | 6 | 54.2 [" in table and "100.0 [100.0–100.0] / 100.0 [100.0–100.0] |" in table
    report = evaluate_embeddings(emb, read_catalog(catalog_dir), k=3, sample_queries=3, seed=1)
    assert report["settings"]["n_items"] == 7 and report["groups"]["colour"]["queries"] == 3
    with pytest.raises(SystemExit):
        main(["--embeddings", str(emb), "--catalog", str(catalog_dir), "--sample-queries", "0"])


def test_read_rows_reads_only_the_asked_rows(tmp_path, monkeypatch):
    from retrieval.data import embfile

    emb = write_embeddings(tmp_path / "emb.h5", ROWS)
    monkeypatch.setattr(embfile, "CHUNK_ROWS", 2)  # rows 6, 0, 3 and 10 span three slices of two
    whole, part = embfile.read_embeddings(emb), embfile.read_rows(emb, np.array([6, 0, 3, 10]))
    assert part.paths == ["img/06.png", "img/00.png", "img/03.png", "img/11.png"]
    assert part.ids.tolist() == [6, 0, 3, 11] and part.fingerprint == "sha-test"
    assert np.array_equal(part.vectors, whole.vectors[[6, 0, 3, 10]])
    assert np.array_equal(part.group_vectors["type"], whole.group_vectors["type"][[6, 0, 3, 10]])
    assert embfile.read_paths(emb) == whole.paths
    with pytest.raises(embfile.EmbeddingsError, match="rows outside 0..10"):
        embfile.read_rows(emb, np.array([11]))
    with h5py.File(emb, "a") as f:
        del f["ids"]
        f["ids"] = np.arange(3)
    with pytest.raises(embfile.EmbeddingsError, match="dataset 'ids' has 3 rows, 'vectors' has 11"):
        embfile.read_rows(emb, np.array([0]))

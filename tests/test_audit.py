"""Label audit: planted wrong, missing and conflicting labels are found; decisions are appended
without losing lines and applied to a valid corrected copy."""
import csv
import dataclasses
import shutil
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from web_fixtures import web_audit, web_data  # noqa: F401

from retrieval.audit.decisions import append_decision, apply_decisions, read_decisions
from retrieval.audit.labels import Issue, audit_catalog, crowded_groups, fold_of, read_issues, summarize
from retrieval.cli import main as cli
from retrieval.data.catalog import Catalog, Item, read_catalog


def synthetic(n_per_class=40, classes=("a", "b", "c"), seed=0):
    """Items whose features cluster by class: 5 flipped labels, 5 blanked, 1 duplicate pair in conflict."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(classes), 32)) * 4
    truth = np.repeat(np.arange(len(classes)), n_per_class)
    x = (centres[truth] + rng.standard_normal((len(truth), 32))).astype(np.float32)
    given = [classes[t] for t in truth]
    flipped = [3, 50, 97, 101, 17]
    for i in flipped:
        given[i] = classes[(truth[i] + 1) % len(classes)]
    blanked = [8, 60, 110, 30, 70]
    for i in blanked:
        given[i] = ""
    x[2] = x[1]  # an exact duplicate of item 1 (same class), labelled differently in "other"
    other = ["x"] * len(truth)
    other[2] = "y"
    items = [Item(i, f"images/{i}.jpg", "train", "", {"type": (g,) if g else (), "other": (o,)})
             for i, (g, o) in enumerate(zip(given, other))]
    return Catalog("/nowhere", ["type", "other"], items), x, truth, flipped, blanked, classes


def test_audit_finds_planted_wrong_missing_and_duplicate_labels():
    catalog, x, truth, flipped, blanked, classes = synthetic()
    issues = audit_catalog(catalog, x, np.ones(len(x), bool), ["type", "other"], folds=5, min_confidence=0.6)
    wrong = [i for i in issues if i.group == "type" and i.kind == "wrong"]
    top = {int(i.image.split("/")[1].split(".")[0]) for i in wrong[:len(flipped)]}
    assert top == set(flipped)  # the flipped labels rank first
    for issue in wrong[:len(flipped)]:
        row = int(issue.image.split("/")[1].split(".")[0])
        assert issue.suggested == classes[truth[row]] and issue.neighbours.count("|") == 4
    missing = {i.image: i.suggested for i in issues if i.kind == "missing"}
    assert missing == {f"images/{b}.jpg": classes[truth[b]] for b in blanked}
    dup = [i for i in issues if i.kind == "conflicting-duplicate"]
    assert [(i.image, i.group, i.given, i.suggested, i.neighbours) for i in dup] == \
        [("images/1.jpg", "other", "x", "y", "images/2.jpg")]


def test_a_group_of_one_label_gets_no_suggestion(caplog):
    # a flag written only where it holds ('striped' on a few rows): its head scores it 1 everywhere,
    # which suggested it for every empty cell at confidence 1.0
    catalog, x, *_ = synthetic()
    items = [Item(it.row_id, it.image, it.split, "", {**it.labels, "flag": ("striped",) if it.row_id % 20 == 0 else ()})
             for it in catalog.items]
    flagged = Catalog("/nowhere", ["type", "other", "flag"], items)
    issues = audit_catalog(flagged, x, np.ones(len(x), bool), ["type", "flag"], folds=5, min_confidence=0.6)
    assert not [i for i in issues if i.group == "flag"] and [i for i in issues if i.group == "type"]
    assert "group 'flag' has one label ('striped'): no label of it can be wrong or suggested" in caplog.text


def test_a_multi_label_suggestion_has_at_most_as_many_labels_as_an_item_of_the_group():
    """Every label over the threshold, in vocabulary order, but no more than the most labels any item
    of the group has (the likeliest ones); a single-label group's suggestion is its top label."""
    from retrieval.audit.labels import most_labels, suggest

    vocab = ["black", "blue", "green", "red", "white"]
    p = np.array([0.6, 0.9, 0.2, 0.7, 0.55])
    assert suggest(p, vocab, multi=True) == "black|blue|red|white"
    assert suggest(p, vocab, multi=True, most=2) == "blue|red"
    assert suggest(p, vocab, multi=True, threshold=0.95, most=2) == "blue"  # none over: the top one
    assert suggest(p, vocab, multi=False, most=2) == "blue"
    items = [Item(i, f"{i}.jpg", "train", "", {"colour": labels}) for i, labels in
             enumerate([("black",), ("blue", "red"), (), ("black", "red", "white")])]
    catalog = Catalog("/nowhere", ["colour"], items, {"colour": vocab})
    assert most_labels(catalog, "colour") == 3


def test_cleanlabs_warnings_for_rare_labels_become_one_log_line(caplog, monkeypatch):
    # cleanlab warns once for each label (each yes/no task of a multi-label group) with too few
    # examples: dozens of lines on a catalogue's colours. The audit logs one line per group and lets
    # any other warning through (cleanlab stands in here: its own condition needs a real catalogue)
    import logging
    import warnings

    import cleanlab.multilabel_classification.filter as multilabel_filter

    from retrieval.audit.labels import wrong_labels

    def find_label_issues(labels, probs, **kwargs):
        for k in (1, 1):
            warnings.warn(f"May not flag all label issues in class: {k}, it has too few examples (see "
                          "`min_examples_per_class` argument)")
        warnings.warn("something else")
        return np.array([], dtype=np.int64)
    monkeypatch.setattr(multilabel_filter, "find_label_issues", find_label_issues)
    sets = [("a",)] * 30 + [("b",)] * 28 + [("a", "rare"), ("b", "odd")]
    items = [Item(i, f"images/{i}.jpg", "train", "", {"colours": labels}) for i, labels in enumerate(sets)]
    catalog = Catalog("/nowhere", ["colours"], items)
    probs = np.random.default_rng(0).uniform(0.05, 0.95, (len(items), len(catalog.vocab["colours"])))
    caplog.set_level(logging.INFO, logger="retrieval.audit.labels")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert wrong_labels(catalog, "colours", probs, np.arange(len(items)), multi=True) == []
    assert [str(w.message) for w in said] == ["something else"]
    assert "colours: 2 of its labels have too few examples for cleanlab to flag all their issues" in caplog.text


def test_summary_notes_the_groups_with_more_than_a_quarter_flagged_wrong():
    # 8 items; type: all labelled, 3 flagged wrong (37.5%); colour: 4 labelled, 1 wrong (25%, not over)
    # and 3 missing (those do not count)
    items = [Item(i, f"images/{i}.jpg", "train", "", {"type": ("a",), "colour": ("red",) if i < 4 else ()})
             for i in range(8)]
    catalog = Catalog("/nowhere", ["type", "colour"], items)
    issues = [Issue(f"images/{i}.jpg", "type", "a", "b", 0.9, "wrong") for i in range(3)]
    issues += [Issue("images/0.jpg", "colour", "red", "blue", 0.8, "wrong")]
    issues += [Issue(f"images/{i}.jpg", "colour", "", "red", 0.95, "missing") for i in range(4, 7)]
    assert crowded_groups(issues, catalog, ["type", "colour"]) == ["type"]
    table = summarize(issues, catalog, ["type", "colour"])
    assert "| type | 8 | 3 | 0 | 0 |" in table and "| colour | 4 | 1 | 3 | 0 |" in table
    assert table.splitlines()[-1].startswith("type: more than 25% of the labelled items flagged wrong")
    assert "review from the top" in table
    assert "more than" not in summarize(issues, catalog, ["colour"])


def test_folds_are_balanced_and_seeded():
    fold = fold_of(103, 5, seed=1)
    assert sorted(np.bincount(fold).tolist()) == [20, 20, 21, 21, 21]
    assert (fold == fold_of(103, 5, seed=1)).all() and not (fold == fold_of(103, 5, seed=2)).all()


def test_audit_command_on_the_demo_catalog(demo_catalog, tiny_run, tmp_path, capsys):
    catalog = tmp_path / "catalog"
    shutil.copytree(demo_catalog, catalog)
    # a byte-identical copy of an image, labelled with another category
    lines = (catalog / "labels.csv").read_text().splitlines()
    header, first = lines[0].split(","), lines[1].split(",")
    shutil.copy(catalog / first[0], catalog / "images" / "copy.jpg")
    copy = list(first)
    copy[0] = "images/copy.jpg"
    column = header.index("category")
    copy[column] = "bag" if first[column] != "bag" else "dress"
    (catalog / "labels.csv").write_text("\n".join([*lines, ",".join(copy)]) + "\n")
    out = tmp_path / "audit"
    assert cli(["audit", "--checkpoint", str(tiny_run / "best.pt"), "--catalog", str(catalog), "--out", str(out),
                "--device", "cpu", "--workers", "0", "--folds", "3"]) == 0
    assert "| category |" in capsys.readouterr().out
    with open(out / "issues.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "group", "given", "suggested", "score", "kind", "neighbours"]
    assert {r["kind"] for r in rows} <= {"wrong", "missing", "conflicting-duplicate"}
    assert any(r["kind"] == "conflicting-duplicate" and r["group"] == "category" and
               {r["image"], r["neighbours"]} == {first[0], "images/copy.jpg"} for r in rows)
    assert (out / "summary.md").exists() and (out / "audit.json").exists()


def test_unknown_group_is_refused(demo_catalog, tiny_run, tmp_path, capsys):
    assert cli(["audit", "--checkpoint", str(tiny_run / "best.pt"), "--catalog", str(demo_catalog),
                "--out", str(tmp_path), "--groups", "nope"]) == 1
    assert "choose from" in capsys.readouterr().err


def test_concurrent_decisions_lose_no_line(tmp_path):
    path = tmp_path / "decisions.csv"
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: append_decision(path, f"images/{i}.jpg", "type", "wrong", "a", "b,c", "accept"),
                      range(400)))
    rows = read_decisions(path)
    assert sorted(r["image"] for r in rows) == sorted(f"images/{i}.jpg" for i in range(400))
    assert all(r["suggested"] == "b,c" and r["timestamp"] for r in rows)
    with pytest.raises(ValueError, match="choose one of: accept, reject, skip"):
        append_decision(path, "images/1.jpg", "type", "wrong", "a", "b", "maybe")


def test_apply_writes_a_valid_corrected_copy(demo_catalog, tmp_path, capsys):
    original = (demo_catalog / "labels.csv").read_text()
    items = read_catalog(demo_catalog).items
    first, second = items[0], items[1]
    decisions = tmp_path / "decisions.csv"
    given = {g: "|".join(first.labels[g]) for g in first.labels}
    append_decision(decisions, first.image, "category", "wrong", given["category"], "bag", "accept")
    append_decision(decisions, second.image, "category", "wrong", "|".join(second.labels["category"]), "bag", "accept")
    append_decision(decisions, second.image, "category", "wrong", "", "bag", "reject")  # the later one wins
    append_decision(decisions, first.image, "colours", "missing", given["colours"], "red|blue", "accept")
    out = tmp_path / "fixed"
    assert cli(["audit", "apply", "--catalog", str(demo_catalog), "--decisions", str(decisions), "--out", str(out)]) == 0
    fixed = read_catalog(out).by_image()
    assert fixed[first.image].labels["category"] == ("bag",)
    assert fixed[first.image].labels["colours"] == ("red", "blue")
    assert fixed[second.image].labels == second.labels
    assert (demo_catalog / "labels.csv").read_text() == original  # never edited in place
    assert cli(["catalog-info", str(out)]) == 0
    with pytest.raises(FileExistsError):
        apply_decisions(demo_catalog, read_decisions(decisions), out)
    # a catalog without an image column was "retrieval audit: error: image"
    headless = tmp_path / "headless"
    headless.mkdir()
    (headless / "labels.csv").write_text("photo,category\na.jpg,bag\n")
    assert cli(["audit", "apply", "--catalog", str(headless), "--decisions", str(decisions),
                "--out", str(tmp_path / "fixed2")]) == 1
    assert "headless/labels.csv: missing header; the first line must be 'image,split,title" in capsys.readouterr().err
    assert not (tmp_path / "fixed2").exists()


def test_apply_reads_a_spreadsheets_export_as_the_catalog_does(tmp_path):
    # semicolons, a padded header, Windows backslashes in the image paths, a spelling merged by case,
    # Windows-1252 text: the decisions name the images and labels as read_catalog gives them
    from PIL import Image

    src = tmp_path / "export"
    (src / "photos").mkdir(parents=True)
    for name in ("a", "b", "c"):
        Image.new("RGB", (8, 8)).save(src / "photos" / f"{name}.jpg")
    rows = ["image ; split;title ;colour;type", "photos\\a.jpg;Train;Bébé;Rouge;dress",
            "photos\\b.jpg;train;Été;rouge;shirt", "photos\\c.jpg;test;;Bleu;dress"]
    (src / "labels.csv").write_bytes(("\r\n".join(rows) + "\r\n").encode("cp1252"))
    items = read_catalog(src).by_image()
    assert set(items) == {"photos/a.jpg", "photos/b.jpg", "photos/c.jpg"}
    decisions = tmp_path / "decisions.csv"
    append_decision(decisions, "photos/b.jpg", "type", "wrong", "shirt", "dress", "accept")
    append_decision(decisions, "photos/c.jpg", "colour", "wrong", "Bleu", "Rouge", "accept")
    out = tmp_path / "fixed"
    assert apply_decisions(src, read_decisions(decisions), out) == 2
    fixed = read_catalog(out).by_image()
    assert fixed["photos/b.jpg"].labels == {"colour": ("Rouge",), "type": ("dress",)}
    assert fixed["photos/c.jpg"].labels["colour"] == ("Rouge",) and fixed["photos/a.jpg"].title == "Bébé"
    assert [it.split for it in fixed.values()] == ["train", "train", "test"]
    assert (out / "photos" / "a.jpg").exists()
    assert (out / "labels.csv").read_text(encoding="utf-8").startswith("image,split,title,colour,type\n")


def test_apply_links_a_symlinks_file_and_leaves_nothing_when_it_fails(tmp_path, monkeypatch):
    # images kept as relative symbolic links (links/a.jpg -> ../real/a.jpg): the copy's link pointed
    # nowhere, the check failed and the half-written folder made a second try "exists"
    from PIL import Image

    import retrieval.audit.decisions as decisions

    src = tmp_path / "shop"
    (src / "real").mkdir(parents=True)
    (src / "links").mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (8, 8)).save(src / "real" / f"{name}.jpg")
        (src / "links" / f"{name}.jpg").symlink_to(f"../real/{name}.jpg")
    (src / "labels.csv").write_text("image,split,colour\nlinks/a.jpg,train,red\nlinks/b.jpg,test,blue\n")
    log = tmp_path / "decisions.csv"
    append_decision(log, "links/b.jpg", "colour", "wrong", "blue", "red", "accept")
    out = tmp_path / "fixed"
    real = decisions.read_catalog  # the source reads; the copy's check fails

    def copy_fails(root, check_files=True):
        if Path(root) == src:
            return real(root, check_files)
        raise RuntimeError("check failed")

    monkeypatch.setattr(decisions, "read_catalog", copy_fails)
    with pytest.raises(RuntimeError, match="check failed"):
        apply_decisions(src, read_decisions(log), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decisions.csv", "shop"]  # nothing left behind
    monkeypatch.undo()
    out.mkdir()  # an empty folder is fine
    assert apply_decisions(src, read_decisions(log), out) == 1
    copied = out / "links" / "b.jpg"
    assert not copied.is_symlink() and copied.stat().st_ino == (src / "real" / "b.jpg").stat().st_ino
    assert read_catalog(out).by_image()["links/b.jpg"].labels["colour"] == ("red",)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decisions.csv", "fixed", "shop"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not an empty folder"):
        apply_decisions(src, read_decisions(log), tmp_path / "other")
    # a killed apply's copy (.fixed2.partial-* before, no writer in its name) stayed for ever: now the
    # next apply beside it removes a gone writer's
    import subprocess

    from indexer.stale import HOST

    gone = subprocess.Popen(["true"])
    gone.wait()
    left = tmp_path / f".fixed2.tmp-{HOST}-{gone.pid}-ab12cd34"
    (left / "links").mkdir(parents=True)
    (left / "links" / "a.jpg").write_bytes(b"half")
    assert apply_decisions(src, read_decisions(log), tmp_path / "fixed2") == 1
    assert not left.exists() and (tmp_path / "fixed2" / "labels.csv").is_file()


def test_apply_passes_over_decisions_it_cannot_apply_and_says_so(tmp_path, capsys, caplog):
    # stale (the cell changed since the audit), an image or group gone, a column that is no group, an
    # empty suggestion: each was applied or dropped silently
    from PIL import Image

    src = tmp_path / "cat"
    src.mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (8, 8)).save(src / f"{name}.jpg")
    (src / "labels.csv").write_text("image,split,colour,type\na.jpg,train,red,dress\nb.jpg,train,Navy  Blue,shirt\n"
                                    "c.jpg,test,blue,dress\n")
    log = tmp_path / "decisions.csv"
    append_decision(log, "a.jpg", "colour", "wrong", "blue", "green", "accept")  # the cell says red now: stale
    append_decision(log, "b.jpg", "colour", "wrong", "navy blue", "black", "accept")  # the same, spelt otherwise
    append_decision(log, "gone.jpg", "colour", "wrong", "red", "blue", "accept")
    append_decision(log, "c.jpg", "fabric", "missing", "", "cotton", "accept")
    append_decision(log, "c.jpg", "split", "wrong", "test", "train", "accept")
    append_decision(log, "c.jpg", "type", "wrong", "dress", "", "accept")
    assert apply_decisions(src, read_decisions(log), tmp_path / "out") == 1
    fixed = read_catalog(tmp_path / "out").by_image()
    assert fixed["a.jpg"].labels["colour"] == ("red",) and fixed["b.jpg"].labels["colour"] == ("black",)
    assert fixed["c.jpg"].split == "test" and fixed["c.jpg"].labels["type"] == ("dress",)
    assert ("accepted decisions not applied: 1 for an image no longer in the catalog; 2 for a group no longer in "
            "it (or not a group); 1 for an empty suggestion; 1 whose cell changed since the audit") in caplog.text
    # a decisions file that is not one: named, never an empty copy
    assert cli(["audit", "apply", "--catalog", str(src), "--decisions", str(tmp_path / "nope.csv"),
                "--out", str(tmp_path / "o2")]) == 1
    assert "nope.csv: no such decisions file" in capsys.readouterr().err and not (tmp_path / "o2").exists()
    for bad, content in (("short.csv", "image,group,decision\na.jpg,colour,accept\n".encode()),
                         ("utf16.csv", "timestamp,image\n".encode("utf-16"))):
        (tmp_path / bad).write_bytes(content)
        with pytest.raises(ValueError, match=bad + r": (not a decisions file \(no column timestamp, kind, given, "
                                                   r"suggested|cannot read it as a decisions file)"):
            read_decisions(tmp_path / bad)


def test_review_api_is_read_only_without_review(web_data, web_audit, tmp_path):
    from web_fixtures import make_config

    from web import create_app

    audit = tmp_path / "audit"
    shutil.copytree(web_audit, audit)
    (audit / "decisions.csv").unlink(missing_ok=True)
    read_only = create_app(make_config(web_data, tmp_path, AUDIT_DIR=str(audit))).test_client()
    body = read_only.get("/api/review/issues?kind=wrong").get_json()
    assert body["total"] > 0 and body["review"] is False and body["issues"][0]["kind"] == "wrong"
    issue = body["issues"][0]
    refused = read_only.post("/api/review/decisions", json={**issue, "decision": "accept"})
    assert refused.status_code == 403 and "--review" in refused.get_json()["error"]
    assert "--review" in read_only.get("/review").get_data(as_text=True)
    assert not (audit / "decisions.csv").exists()

    client = create_app(make_config(web_data, tmp_path, AUDIT_DIR=str(audit), REVIEW=True)).test_client()
    done = client.post("/api/review/decisions", json={**issue, "decision": "accept"})
    assert done.status_code == 201 and done.get_json()["suggested"] == issue["suggested"]
    after = client.get("/api/review/issues?kind=wrong").get_json()
    assert after["total"] == body["total"] - 1  # decided issues leave the list
    assert client.post("/api/review/decisions", json={**issue, "decision": "maybe"}).status_code == 400
    assert client.post("/api/review/decisions", json={**issue, "image": "x.jpg", "decision": "skip"}).status_code == 404
    assert client.get("/api/review/issues?kind=odd").status_code == 400
    assert [r["decision"] for r in read_decisions(audit / "decisions.csv")] == ["accept"]
    form = client.post("/review/decide", data={**body["issues"][1], "decision": "skip", "filter_kind": "wrong"})
    assert form.status_code == 302 and "kind=wrong" in form.headers["Location"]
    # a body that is no JSON object was a 500 (a list) or "Missing field(s)" (malformed JSON)
    listed = client.post("/api/review/decisions", json=[issue])
    assert listed.status_code == 400 and "not a JSON object" in listed.get_json()["error"]
    broken = client.post("/api/review/decisions", data="{", content_type="application/json")
    assert broken.status_code == 400 and "not valid JSON" in broken.get_json()["error"]
    # a hand-edited row that is no decision stopped the review with a 500: skipped, the rest still counted
    with open(audit / "decisions.csv", "a") as f:
        f.write("oops,,,,,,\n")
    assert client.get("/api/review/issues?kind=wrong").get_json()["total"] == body["total"] - 2
    assert client.get("/review").status_code == 200


def test_review_keeps_its_page_and_an_issue_is_its_image_group_and_kind(web_data, web_audit, tmp_path):
    # deciding went back to page 1; an item's wrong-label decision hid its duplicate conflict in the same
    # group; a page past the end said "Nothing left" with issues waiting
    from web_fixtures import make_config

    from web import create_app

    audit = tmp_path / "audit"
    shutil.copytree(web_audit, audit)
    (audit / "decisions.csv").unlink(missing_ok=True)
    issues = read_issues(audit / "issues.csv")
    first = issues[0]
    twin = Issue(first.image, first.group, first.given, first.suggested, 0.99, "conflicting-duplicate",
                 issues[1].image)
    with open(audit / "issues.csv", "a", newline="") as f:
        csv.DictWriter(f, list(dataclasses.asdict(twin))).writerow(dataclasses.asdict(twin))
    client = create_app(make_config(web_data, tmp_path, AUDIT_DIR=str(audit), REVIEW=True)).test_client()
    total = client.get("/api/review/issues").get_json()["total"]
    assert client.post("/api/review/decisions", json={"image": first.image, "group": first.group,
                                                      "kind": first.kind, "decision": "reject"}).status_code == 201
    assert client.get("/api/review/issues").get_json()["total"] == total - 1
    conflicts = client.get(f"/api/review/issues?kind=conflicting-duplicate&group={first.group}").get_json()["issues"]
    assert first.image in [i["image"] for i in conflicts]  # its twin of another kind is still waiting
    pages = -(-(total - 1) // 12)
    assert pages > 1
    html = client.get("/review?page=999").get_data(as_text=True)
    assert f"page {pages} of {pages}" in html and "Nothing left" not in html
    issue = client.get("/api/review/issues?page=2").get_json()["issues"][0]
    form = client.post("/review/decide", data={**issue, "decision": "skip", "filter_page": "2"})
    assert form.status_code == 302 and "page=2" in form.headers["Location"]


def test_review_names_an_audit_file_it_cannot_read(web_data, web_audit, tmp_path):
    # issues.csv with other columns or not UTF-8, decisions.csv of another header: each was a 500
    from web_fixtures import make_config

    from web import create_app

    for name, content, message in (("decisions.csv", b"foo,bar\n1,2\n", "not a decisions file"),
                                   ("issues.csv", b"image,group\na.jpg,x\n", "cannot be read as an audit"),
                                   ("issues.csv", b"\xff\xfe\x00", "cannot be read as an audit")):
        audit = tmp_path / f"audit-{name}-{len(content)}"
        shutil.copytree(web_audit, audit)
        (audit / name).write_bytes(content)
        client = create_app(make_config(web_data, tmp_path, AUDIT_DIR=str(audit))).test_client()
        for url in ("/api/review/issues", "/review"):
            response = client.get(url)
            assert response.status_code == 503 and message in response.get_data(as_text=True), (name, url)


def test_review_without_an_audit_says_how(web_data, tmp_path):
    from web_fixtures import make_config

    from web import create_app

    client = create_app(make_config(web_data, tmp_path)).test_client()
    response = client.get("/api/review/issues")
    assert response.status_code == 503 and "retrieval audit" in response.get_json()["error"]


def test_review_says_when_an_issue_photo_is_no_longer_indexed(web_data, web_audit, tmp_path):
    # /images serves indexed paths only: an image removed since the audit showed as a broken picture
    from web_fixtures import copy_index, make_config

    from web import create_app

    first = read_issues(web_audit / "issues.csv")[0]
    index = copy_index(web_data, tmp_path)
    assert cli(["index", "remove", "--index", str(index), "--paths", first.image]) == 0
    client = create_app(make_config(web_data, tmp_path, INDEX_DIR=str(index), AUDIT_DIR=str(web_audit))).test_client()
    issues = client.get("/api/review/issues").get_json()["issues"]
    assert [i["indexed"] for i in issues if i["image"] == first.image] == [False]
    assert all(i["indexed"] for i in issues if i["image"] != first.image)
    html = client.get("/review").get_data(as_text=True)
    assert "not in the index (removed since the audit?)" in html
    assert f'src="/images/{first.image}"' not in html


def test_the_audit_features_are_reduced_the_same_way_every_run():
    # the randomised PCA drew from torch's global generator: two audits of one catalog listed other issues
    import torch

    from retrieval.audit.labels import reduce_dimensions

    x = torch.randn(300, 400, generator=torch.Generator().manual_seed(0))
    first = reduce_dimensions(x, 32)
    torch.manual_seed(123)  # whatever ran before
    assert torch.equal(reduce_dimensions(x, 32), first)
    state = torch.get_rng_state()
    reduce_dimensions(x, 32, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is left as it was

"""Bad files under a running server and at start-up: an index, an audit, a catalog, a report, a cache
folder that cannot be used is named (503 / one line), never a 500 or a traceback; a broken index
swapped in keeps the previous one serving."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from web_fixtures import copy_index, make_config, web_audit, web_data  # noqa: F401

from indexer import IndexStore
from retrieval.audit.labels import read_issues
from retrieval.cli import main as cli
from web import create_app


@pytest.fixture
def quiet_serve(monkeypatch):
    """`retrieval serve` without setting FAISS to one thread for the other tests of the process."""
    import web.serve

    monkeypatch.setattr(web.serve, "use_one_thread_per_search", lambda: None)


def empty_ids(index):
    (index / "items-ids.npy").write_bytes(b"")  # a copy cut short


def edit_sidecar(change):
    def edit(index):
        sidecar = json.loads((index / "sidecar.json").read_text())
        change(sidecar)
        (index / "sidecar.json").write_text(json.dumps(sidecar))
    return edit


# each was a traceback at start-up and in `retrieval index remove`, and a 500 on every page once swapped in
# (EOFError, AttributeError), or a message saying "has dimension 288, its sidecar says 288"
BROKEN = {
    "empty items file": (empty_ids, r"items-ids\.npy: No data left in file"),
    "views a list": (edit_sidecar(lambda s: s.__setitem__("views", list(s["views"]))),
                     r"sidecar\.json: views is a list, not an object \{view: dimension\}"),
    "files a list": (edit_sidecar(lambda s: s.__setitem__("files", ["x"])),
                     r"sidecar\.json: files is a list"),
    "labels a list": (edit_sidecar(lambda s: s.__setitem__("labels", [])), r"sidecar\.json: labels is a list"),
    "dimension a string": (edit_sidecar(lambda s: s["views"].__setitem__("shared", str(s["views"]["shared"]))),
                           r"sidecar\.json: views\['shared'\] is '\d+', not a dimension"),
    # a shortened vocabulary passed `index remove`, which saved it, and then / and /api/items were a 500
    "vocabulary shortened": (edit_sidecar(lambda s: s["labels"].__setitem__("category", s["labels"]["category"][:1])),
                             r"items-posting_offsets\.npy: \d+ labels; the sidecar's vocabulary \(labels\) has \d+"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_a_malformed_index_is_refused_naming_its_file(web_data, tmp_path, capsys, quiet_serve, name):
    spoil, message = BROKEN[name]
    index = copy_index(web_data, tmp_path)
    spoil(index)
    with pytest.raises(ValueError, match=message) as err:
        IndexStore.load(index)
    assert str(index) in str(err.value)
    before = {p.name: p.read_bytes() for p in index.iterdir()}
    assert cli(["index", "remove", "--index", str(index), "--ids", "1"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("retrieval index: error: ") and str(index) in lines[0]
    assert {p.name: p.read_bytes() for p in index.iterdir()} == before  # nothing saved over it
    assert cli(["serve", "--index", str(index), "--catalog", str(web_data["catalog"]),
                "--cache-dir", str(tmp_path / "thumbs")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("retrieval serve: error: ") and str(index) in lines[0]


@pytest.mark.parametrize("name", ["empty items file", "views a list", "vocabulary shortened"])
def test_a_broken_index_swapped_in_keeps_the_previous_one(web_data, tmp_path, name):
    # every page and /api/health answered 500 once the broken copy was renamed into place
    index = copy_index(web_data, tmp_path)
    client = create_app(make_config(web_data, tmp_path, INDEX_DIR=str(index))).test_client()
    assert client.get("/api/items").status_code == 200
    new = tmp_path / "new"
    shutil.copytree(index, new)
    BROKEN[name][0](new)
    os.rename(index, tmp_path / "old")
    os.rename(new, index)
    for url in ("/", "/api/items", "/items/1", "/api/labels"):
        assert client.get(url).status_code in (200, 404), url
    health = client.get("/api/health").get_json()
    assert health["index_size"] == 60 and str(index) in health["reload_error"]
    # a good index swapped in after it is picked up again
    os.rename(index, tmp_path / "broken")
    os.rename(tmp_path / "old", index)
    os.utime(index / "sidecar.json")
    assert client.get("/api/health").get_json()["reload_error"] is None


def test_a_swap_killed_between_its_renames_is_finished_by_the_server(web_data, tmp_path):
    # a writer killed after "index -> .old" and before ".tmp -> index": serve exited with "No such file
    # or directory: .../sidecar.json" at start-up (index add / remove put the new index in place), and a
    # running server kept the index before the swap for good
    import subprocess

    from indexer.stale import HOST

    gone = subprocess.Popen(["true"])
    gone.wait()

    def killed_swap(index, new, tag):
        os.rename(index, index.parent / f".{index.name}.old-{HOST}-{gone.pid}-{tag}")
        os.rename(new, index.parent / f".{index.name}.tmp-{HOST}-{gone.pid}-{tag}")

    index = copy_index(web_data, tmp_path)
    new = tmp_path / "new"
    shutil.copytree(index, new)
    assert cli(["index", "remove", "--index", str(new), "--ids", "1"]) == 0
    killed_swap(index, new, "0a1b2c3d")
    client = create_app(make_config(web_data, tmp_path, INDEX_DIR=str(index))).test_client()
    assert client.get("/api/health").get_json()["index_size"] == 59  # the new index, put in place
    shutil.copytree(index, new)
    assert cli(["index", "remove", "--index", str(new), "--ids", "2"]) == 0
    killed_swap(index, new, "1a2b3c4d")  # under the running server
    assert client.get("/api/health").get_json()["index_size"] == 58
    assert (index / "sidecar.json").is_file()


def test_an_index_that_breaks_before_the_first_request_is_a_503_naming_it(web_data, tmp_path):
    index = copy_index(web_data, tmp_path)
    empty_ids(index)
    client = create_app(make_config(web_data, tmp_path, INDEX_DIR=str(index))).test_client()
    response = client.get("/api/items")
    assert response.status_code == 503 and "items-ids.npy" in response.get_json()["error"]
    assert client.get("/").status_code == 503


# ---- label review ------------------------------------------------------------------------------

def test_read_issues_names_the_file_and_line_of_a_row_that_is_no_issue(tmp_path):
    # a row missing its last cell gave issues whose neighbours were None (the review's 500)
    header = "image,group,given,suggested,score,kind,neighbours"
    for rows, message in ((["a.jpg,colour,red,blue,0.9,wrong"], r"line 2: 6 cells, the header has 7"),
                          (["a.jpg,colour,red,blue,0.9,wrong,,x"], r"line 2: 8 cells, the header has 7"),
                          (["a.jpg,colour,red,blue,0.9,wrong,", "b.jpg,colour,red,blue,high,wrong,"],
                           r"line 3: score 'high' is not a number")):
        path = tmp_path / "issues.csv"
        path.write_text("\n".join([header, *rows]) + "\n")
        with pytest.raises(ValueError, match=f"{path}, {message}"):
            read_issues(path)
    path.write_text("image,group\na.jpg,x\n")
    with pytest.raises(ValueError, match="not an issues file"):
        read_issues(path)
    path.write_text(f"{header},note\na.jpg,colour,red,blue,0.9,wrong,b.jpg,x\n")  # a column it does not know
    assert read_issues(path)[0].neighbours == "b.jpg"


def test_review_names_a_short_issues_row_and_a_bad_catalog(web_data, web_audit, tmp_path):
    # a row of issues.csv missing its last cell, or a catalog labels.csv that is not one: both a 500
    audit = tmp_path / "audit"
    shutil.copytree(web_audit, audit)
    (audit / "decisions.csv").unlink(missing_ok=True)
    lines = (audit / "issues.csv").read_text().splitlines()
    lines[1] = lines[1].rsplit(",", 1)[0]
    (audit / "issues.csv").write_text("\n".join(lines) + "\n")
    client = create_app(make_config(web_data, tmp_path, AUDIT_DIR=str(audit))).test_client()
    for url in ("/review", "/api/review/issues"):
        response = client.get(url)
        text = response.get_data(as_text=True)
        assert response.status_code == 503 and "issues.csv, line 2: 6 cells, the header has 7" in text, url

    catalog = tmp_path / "catalog"
    catalog.mkdir()
    (catalog / "labels.csv").write_text("foo,bar\n1,2\n")
    client = create_app(make_config(web_data, tmp_path, AUDIT_DIR=str(web_audit),
                                    CATALOG_DIR=str(catalog))).test_client()
    for url in ("/review", "/api/review/issues"):
        response = client.get(url)
        assert response.status_code == 503 and str(catalog / "labels.csv") in response.get_data(as_text=True), url


def test_review_names_a_decisions_file_it_cannot_write(web_data, web_audit, tmp_path):
    # decisions.csv a folder: POST /api/review/decisions was a 500 (IsADirectoryError)
    audit = tmp_path / "audit"
    shutil.copytree(web_audit, audit)
    (audit / "decisions.csv").unlink(missing_ok=True)
    issue = read_issues(audit / "issues.csv")[0]
    (audit / "decisions.csv").mkdir()
    client = create_app(make_config(web_data, tmp_path, AUDIT_DIR=str(audit), REVIEW=True)).test_client()
    response = client.post("/api/review/decisions", json={"image": issue.image, "group": issue.group,
                                                          "kind": issue.kind, "decision": "accept"})
    assert response.status_code == 503
    assert response.get_json()["error"] == (f"The decision was not recorded: cannot record a decision in "
                                            f"{audit / 'decisions.csv'} (Is a directory)")


# ---- evaluation report -------------------------------------------------------------------------

REPORT = {"settings": {"k": 10, "split": "all", "n_items": 60},
          "groups": {"category": {"map_paper": 0.5, "map_standard": 0.4, "queries": 50,
                                  "group_view": {"map_paper": 0.6, "map_standard": 0.5}}},
          "mean": {"map_paper": 0.5, "map_standard": 0.4}}


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["groups"].__setitem__("category", "0.5"), "groups.category is "),
    (lambda r: r["groups"]["category"].__setitem__("group_view", [0.6]), "groups.category.group_view is "),
    (lambda r: r["groups"]["category"].__setitem__("map_paper", "high"), "groups.category.map_paper is "),
    (lambda r: r["mean"].__setitem__("map_standard", "x"), "mean.map_standard is "),
])
def test_evaluation_names_a_hand_edited_report(web_data, tmp_path, edit, message):
    # each was a 500 on /evaluation (load_report now refuses them too; table_rows checks what it reads)
    report = json.loads(json.dumps(REPORT))
    client = create_app(make_config(web_data, tmp_path, REPORT_DIR=str(tmp_path))).test_client()
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert "category" in client.get("/evaluation").get_data(as_text=True)  # the unedited one reads
    edit(report)
    (tmp_path / "report.json").write_text(json.dumps(report))
    page = client.get("/evaluation")
    text = page.get_data(as_text=True)
    assert page.status_code == 200 and f"The report in {tmp_path} cannot be read" in text
    assert message in text


# ---- serve options and the thumbnail cache --------------------------------------------------------

def test_serve_refuses_an_upload_limit_not_above_zero_and_a_cache_that_is_a_file(web_data, tmp_path, capsys,
                                                                                 quiet_serve):
    # --max-upload-mb -1 started a server whose every upload was a 413 "limit is -1 MB"; --cache-dir of a
    # file started one whose every thumbnail was a 500
    for value in ("-1", "0"):
        with pytest.raises(SystemExit):
            cli(["serve", "--index", "i", "--catalog", "c", "--max-upload-mb", value])
        assert f"argument --max-upload-mb: {float(value):g} is not above 0" in capsys.readouterr().err
    cache = tmp_path / "cache"
    cache.write_text("a file")
    assert cli(["serve", "--index", str(web_data["index"]), "--catalog", str(web_data["catalog"]),
                "--cache-dir", str(cache)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"retrieval serve: error: --cache-dir {cache}: cannot be the thumbnail cache "
                   "(it is a file, not a folder)"]


def test_a_thumbnail_cache_that_cannot_be_written_is_a_503_naming_it(web_data, tmp_path):
    cache = tmp_path / "cache"
    cache.write_text("a file")
    client = create_app(make_config(web_data, tmp_path, THUMB_DIR=str(cache))).test_client()
    item = client.get("/api/items").get_json()["items"][0]["id"]
    response = client.get(f"/thumbs/{item}.jpg")
    assert response.status_code == 503 and f"The thumbnail cache {cache} cannot be written" in \
        response.get_data(as_text=True)


def test_evaluation_table_refuses_what_it_cannot_show():
    # the page's own check, whatever load_report lets through: an AttributeError / TypeError was the 500
    from web.evaluation import table_rows

    for report, message in (({"groups": {"c": "0.5"}, "mean": {}}, "groups.c is '0.5'"),
                            ({"groups": {"c": {"group_view": 3}}, "mean": {}}, "groups.c.group_view is '3'"),
                            ({"groups": {}, "mean": {"map_paper": "high"}}, "mean.map_paper is 'high'"),
                            ({"groups": {"c": {"queries": [1]}}, "mean": {}}, r"groups.c.queries is '\[1\]'")):
        with pytest.raises(ValueError, match=message):
            table_rows(report)
    assert table_rows(REPORT)[0]["view_paper"] == 60

"""The web app through Flask's test client: every route, every bad input, hot reload of the index."""
from __future__ import annotations

import io
import shutil
import json
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from web_fixtures import (app, build_index, client, copy_index, make_config, photo_bytes, runner,  # noqa: F401
                          web_data, web_report)

from web import create_app


def upload(client, data: bytes, name="photo.jpg", url="/api/search", **fields):
    """POST a photo as multipart field 'image' plus form fields."""
    return client.post(url, data={"image": (io.BytesIO(data), name), **fields}, content_type="multipart/form-data")


def catalog_photo(web_data, fmt="JPEG") -> bytes:
    return photo_bytes(web_data["catalog"] / "images" / "000003.jpg", fmt)


# ---- JSON API ----------------------------------------------------------------------------------

def test_health_reports_index_model_and_views(client):
    body = client.get("/api/health").get_json()
    assert body["index_size"] == 60 and body["search_by_photo"] is True
    assert body["index_fingerprint"] == body["model_fingerprint"] and len(body["model_fingerprint"]) == 64
    assert body["views"][0] == "shared" and "group-colours" in body["views"]
    assert body["shared_view"] == "matches"  # the sidecar's: what uploads are described as


def test_items_pages_filters_and_text(client):
    first = client.get("/api/items?per_page=25").get_json()
    assert (first["total"], first["pages"], len(first["items"])) == (60, 3, 25)
    assert set(first["items"][0]) >= {"id", "title", "labels", "image_url"}
    assert len(client.get("/api/items?per_page=25&page=3").get_json()["items"]) == 10
    women = client.get("/api/items?gender=women&per_page=100").get_json()["items"]
    assert women and all("women" in it["labels"]["gender"] for it in women)
    either = client.get("/api/items?colours=red,blue&per_page=100").get_json()
    repeated = client.get("/api/items?colours=red&colours=blue&per_page=100").get_json()
    assert either == repeated and all({"red", "blue"} & set(it["labels"]["colours"]) for it in either["items"])
    both = client.get("/api/items?colours=red,blue&gender=women&per_page=100").get_json()["items"]
    assert {it["id"] for it in both} == {it["id"] for it in either["items"] if "women" in it["labels"]["gender"]}
    word = first["items"][0]["title"].split()[-1]
    found = client.get(f"/api/items?q={word.upper()}&per_page=100").get_json()["items"]
    assert found and all(word.lower() in it["title"].lower() for it in found)


@pytest.mark.parametrize("query, status, words", [
    ("page=4&per_page=25", 404, "past the last page"), ("page=x", 400, "integer"), ("page=0", 400, "between"),
    ("per_page=1000", 400, "between"), ("colours=purple", 400, "choose from: black, blue"),
    ("nosuchgroup=1&gender=alien", 400, "women"),
])
def test_items_bad_parameters(client, query, status, words):
    response = client.get(f"/api/items?{query}")
    assert response.status_code == status and words in response.get_json()["error"]


def test_empty_result_is_an_empty_first_page(client):
    body = client.get("/api/items?q=no-such-title-anywhere").get_json()
    assert (body["items"], body["total"], body["pages"]) == ([], 0, 0)


def test_item_and_unknown_ids(client):
    assert client.get("/api/items/3").get_json()["id"] == 3
    huge = 10**20  # past int64: was a 500 (OverflowError)
    for url in ("/api/items/999", "/api/items/-1", "/api/items/abc", "/api/items/999/similar", f"/api/items/{huge}",
                f"/api/items/{huge}/similar", f"/api/items/{2**63}/similar?view=group-colours"):
        response = client.get(url)
        assert response.status_code == 404 and "error" in response.get_json(), url
    for url in (f"/items/{huge}", f"/thumbs/{huge}.jpg"):
        assert client.get(url).status_code == 404, url


def test_similar_is_sorted_excludes_the_item_and_filters(client):
    body = client.get("/api/items/3/similar?k=10").get_json()
    scores = [r["score"] for r in body["results"]]
    assert len(scores) == 10 and scores == sorted(scores, reverse=True)
    assert 3 not in [r["id"] for r in body["results"]]
    women = client.get("/api/items/3/similar?k=5&gender=women").get_json()["results"]
    assert len(women) == 5 and all("women" in r["labels"]["gender"] for r in women)
    colours = client.get("/api/items/3/similar?k=5&view=group-colours").get_json()
    assert colours["view"] == "group-colours" and len(colours["results"]) == 5
    bad = client.get("/api/items/3/similar?view=group-nope")
    assert bad.status_code == 400 and "group-colours" in bad.get_json()["error"]
    assert client.get("/api/items/3/similar?k=0").status_code == 400


def test_similar_by_id_needs_no_model(web_data, tmp_path, monkeypatch):
    import retrieval.embed.inference

    monkeypatch.setattr(retrieval.embed.inference, "describe_image", None)  # any call would fail
    client = create_app(make_config(web_data, tmp_path, CHECKPOINT=None)).test_client()
    assert len(client.get("/api/items/5/similar?k=4").get_json()["results"]) == 4
    assert client.get("/api/health").get_json()["model_fingerprint"] is None


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_search_by_photo(client, web_data, fmt):
    response = upload(client, catalog_photo(web_data, fmt), f"q.{fmt.lower()}", k="5", gender="women")
    body = response.get_json()
    assert response.status_code == 200 and set(body["predicted"]) == {"category", "colours", "pattern", "sleeve", "gender"}
    probs = [p["prob"] for p in body["predicted"]["category"]]
    assert probs == sorted(probs, reverse=True) and 0 <= probs[0] <= 1
    assert len(body["results"]) == 5 and all("women" in r["labels"]["gender"] for r in body["results"])
    again = client.get(f"/api/search/{body['query_id']}?k=3&view=group-colours").get_json()
    assert again["view"] == "group-colours" and len(again["results"]) == 3


def test_search_by_photo_runs_the_folded_trunk_to_the_same_vectors(web_data):
    from PIL import Image

    from retrieval.embed.inference import describe_image
    from retrieval.net.checkpoint import load_model
    from web.resources import ModelHolder

    served = ModelHolder(web_data["checkpoint"]).get()[0]
    plain = load_model(web_data["checkpoint"])[0]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in served.trunk.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.trunk.modules())
    photo = Image.open(io.BytesIO(catalog_photo(web_data)))
    a, b = describe_image(served, photo), describe_image(plain, photo)
    assert np.allclose(a.vectors, b.vectors, atol=1e-5)
    assert all(np.allclose(a.probs[g], b.probs[g], atol=1e-5) for g in b.probs)


def test_search_by_photo_follows_an_index_of_the_embedding_alone(web_data, tmp_path):
    """An index built with --shared-view embedding from a matches file: uploads are described by the
    embedding alone (as the index holds), though the model's own setting is matches."""
    from PIL import Image

    from retrieval.cli import main as cli
    from retrieval.data.embfile import embedding_part, read_embeddings
    from retrieval.embed.inference import describe_image
    from web.resources import ModelHolder

    index = tmp_path / "index"
    assert cli(["index", "build", "--embeddings", str(web_data["emb"]), "--out", str(index), "--shared-view",
                "embedding"]) == 0
    client = create_app(make_config(web_data, tmp_path, INDEX_DIR=str(index))).test_client()
    assert client.get("/api/health").get_json()["shared_view"] == "embedding"
    body = upload(client, catalog_photo(web_data), k="5").get_json()
    model = ModelHolder(web_data["checkpoint"]).get()[0]
    assert model.config.shared_view == "matches"
    query = describe_image(model, Image.open(io.BytesIO(catalog_photo(web_data))), shared_view="embedding").vectors
    alone = embedding_part(read_embeddings(web_data["emb"]))
    assert query.shape == (1, 256)
    order = np.argsort(-(alone @ query[0]), kind="stable")[:5]
    assert [r["id"] for r in body["results"]] == order.tolist()
    assert np.allclose([r["score"] for r in body["results"]], (alone @ query[0])[order], atol=1e-4)


def test_a_filter_on_a_group_the_index_has_no_label_for_is_refused(web_data, tmp_path):
    # the index built from a catalog without the gender column keeps the model's group-gender view:
    # ?gender=men was ignored (every item listed, as if filtered)
    from retrieval.cli import main as cli

    catalog = tmp_path / "cat"
    shutil.copytree(web_data["catalog"], catalog)
    rows = [line.split(",") for line in (catalog / "labels.csv").read_text().splitlines()]
    drop = rows[0].index("gender")
    (catalog / "labels.csv").write_text("\n".join(",".join(r[:drop] + r[drop + 1:]) for r in rows) + "\n")
    index = tmp_path / "index"
    assert cli(["index", "build", "--embeddings", str(web_data["emb"]), "--out", str(index),
                "--catalog", str(catalog)]) == 0
    client = create_app(make_config(web_data, tmp_path, INDEX_DIR=str(index), CATALOG_DIR=str(catalog))).test_client()
    for url in ("/api/items?gender=men", "/api/items/3/similar?view=group-gender&gender=men"):
        response = client.get(url)
        assert response.status_code == 400 and "No indexed item is labelled in 'gender'" in response.get_json()["error"]
    assert client.get("/api/items/3/similar?view=group-gender").status_code == 200
    assert client.get("/api/items?colours=red").status_code == 200


def test_search_bad_uploads(client, web_data):
    from PIL import Image

    jpeg = catalog_photo(web_data)
    bomb = io.BytesIO()
    Image.new("1", (6000, 5000)).save(bomb, "PNG")  # 30 Mpx in a few kB
    cases = [(b"not an image at all", "x.jpg", 400, "not an image"), (jpeg[: len(jpeg) // 2], "cut.jpg", 400, "truncated"),
             (bomb.getvalue(), "bomb.png", 400, "exceeds"), (catalog_photo(web_data, "GIF"), "a.gif", 400, "GIF"),
             (b"\xff" * (11 * 1000 * 1000), "big.jpg", 413, "10 MB")]
    for data, name, status, words in cases:
        response = upload(client, data, name)
        assert response.status_code == status, name
        assert words in response.get_json()["error"] and "Traceback" not in response.get_data(as_text=True)
    missing = client.post("/api/search", data={}, content_type="multipart/form-data")
    assert missing.status_code == 400 and "'image'" in missing.get_json()["error"]
    assert client.get("/api/search/nope").status_code == 404


def test_search_without_checkpoint_is_503(web_data, tmp_path):
    client = create_app(make_config(web_data, tmp_path, CHECKPOINT=None)).test_client()
    response = upload(client, catalog_photo(web_data))
    assert response.status_code == 503 and "--checkpoint" in response.get_json()["error"]
    assert upload(client, catalog_photo(web_data), url="/search").status_code == 503
    assert "Search by photo is disabled" in client.get("/search").get_data(as_text=True)


def test_errors_are_json_under_api_and_html_elsewhere(web_data, tmp_path):
    app = create_app(make_config(web_data, tmp_path, TESTING=False))

    def boom():
        raise RuntimeError("secret internals")

    app.add_url_rule("/api/boom", "api_boom", boom)
    app.add_url_rule("/boom", "boom", boom)
    client = app.test_client()
    assert client.get("/api/search").status_code == 405 and "error" in client.get("/api/search").get_json()
    for url, is_json in (("/api/boom", True), ("/boom", False), ("/api/nope", True), ("/nope", False)):
        response = client.get(url)
        text = response.get_data(as_text=True)
        assert response.is_json == is_json and "secret" not in text and "Traceback" not in text
    assert client.get("/api/boom").status_code == 500


# ---- images -----------------------------------------------------------------------------------

def test_images_and_traversal(client):
    assert client.get("/images/images/000003.jpg").content_type == "image/jpeg"
    for url in ("/images/../labels.csv", "/images/%2e%2e/%2e%2e/etc/passwd", "/images/labels.csv",
                "/images/images/../labels.csv", "/images//etc/passwd"):
        assert client.get(url, follow_redirects=True).status_code == 404, url


def test_an_indexed_image_deleted_from_the_catalog_is_said(web_data, tmp_path):
    # a browser-format image answered a bare "Not found" (a HEIC's copy said the file is missing)
    import html
    import shutil

    from web import create_app

    catalog = tmp_path / "catalog"
    shutil.copytree(web_data["catalog"], catalog)
    (catalog / "images/000003.jpg").unlink()
    client = create_app(make_config(web_data, tmp_path, CATALOG_DIR=str(catalog))).test_client()
    response = client.get("/images/images/000003.jpg")
    assert response.status_code == 404
    assert "Image file 'images/000003.jpg' is missing from the catalog" in html.unescape(response.get_data(as_text=True))


def test_thumbnails_are_cached_on_disk(app, client, monkeypatch):
    from PIL import Image

    import web.media

    response = client.get("/thumbs/7.jpg")
    assert response.status_code == 200 and response.content_type == "image/jpeg"
    assert max(Image.open(io.BytesIO(response.data)).size) <= app.config["THUMB_SIZE"]
    cached = list(Path(app.config["THUMB_DIR"]).rglob("*.jpg"))
    assert cached and not list(cached[0].parent.glob(".thumb-*"))
    monkeypatch.setattr(web.media, "write_thumbnail", None)  # a second request must not regenerate
    assert client.get("/thumbs/7.jpg").data == response.data
    assert client.get("/thumbs/999.jpg").status_code == 404


def test_thumbnails_show_what_the_model_sees(tmp_path):
    # 16-bit grey (PIL's own conversion clips it white) and a cut-out on transparency (black under
    # PIL's): each thumbnail is the model's input's colours, mid grey and white around the garment
    from PIL import Image

    from retrieval.data.images import load_image
    from web.media import write_thumbnail

    grey = tmp_path / "grey16.png"
    Image.fromarray(np.full((40, 60), 30000, dtype=np.uint16)).save(grey)
    cutout = np.zeros((40, 60, 4), dtype=np.uint8)
    cutout[10:30, 20:40] = (200, 20, 20, 255)  # a red garment, the rest transparent
    Image.fromarray(cutout, "RGBA").save(tmp_path / "cutout.png")
    for name, centre, corner in (("grey16.png", 117, 117), ("cutout.png", (200, 20, 20), (255, 255, 255))):
        target = tmp_path / f"{name}.jpg"
        assert write_thumbnail(tmp_path / name, target, 64)
        thumb = np.asarray(Image.open(target).convert("RGB")).astype(int)
        seen = np.asarray(load_image(tmp_path / name)).astype(int)
        for y, x, want in ((20, 30, centre), (0, 0, corner)):
            assert np.abs(thumb[y, x] - want).max() <= 6 and np.abs(seen[y, x] - want).max() <= 6, (name, y, x)


def test_thumbs_command_fills_the_cache(runner, app):
    result = runner.invoke(args=["thumbs"])
    assert "60 thumbnails" in result.output and "0 unreadable" in result.output


# ---- pages ------------------------------------------------------------------------------------

def test_browse_page_with_facets_and_pages(client):
    html = client.get("/?gender=women").get_data(as_text=True)
    assert 'class="card"' in html and 'class="count"' in html and "aria-checked=\"true\"" in html
    assert client.get("/?page=99").status_code == 404 and client.get("/?colours=mauve").status_code == 400
    assert "No products match" in client.get("/?q=zzzz").get_data(as_text=True)
    # the demo's 9 categories are listed whole: a fold of "1 more" hid one label behind a click
    assert "<summary>1 more</summary>" not in client.get("/").get_data(as_text=True)


def test_a_facet_lists_its_selected_and_most_frequent_labels_and_finds_the_others(client, monkeypatch):
    """A group of many labels (brands) lists the selected ones and the FACET_ROWS most frequent others;
    a find box (find.<group>, which keeps the page's other parameters) narrows it to the labels holding
    the text; a group of few labels has no box."""
    import re

    from web import facets
    from web.facets import shown_rows

    rows = [{"label": label, "count": count, "selected": label == "navy"}
            for label, count in [("black", 9), ("blue", 7), ("red", 5), ("navy", 2), ("sky blue", 1)]]
    assert shown_rows(rows, limit=2) == ([rows[0], rows[1], rows[3]], 2)
    assert shown_rows(rows, "BLUE", limit=1) == ([rows[1], rows[3]], 1)  # navy: selected, kept
    assert shown_rows(rows, "x", limit=1) == ([rows[3]], 0)
    monkeypatch.setattr(facets, "FACET_ROWS", 2)
    html = client.get("/?gender=women&per_page=5&page=2").get_data(as_text=True)
    category = re.findall(r'data-group="category" data-label="([^"]+)"', html)
    assert len(category) == 2 and 'name="find.category"' in html and 'placeholder="Find among' in html
    box = html[html.index('name="find.category"') - 400:html.index('name="find.category"')]
    assert '<input type="hidden" name="gender" value="women">' in box and 'name="per_page" value="5"' in box
    assert 'name="page"' not in box
    found = client.get("/?gender=women&find.category=ss").get_data(as_text=True)  # dress, ...
    assert re.findall(r'data-group="category" data-label="([^"]+)"', found)
    assert all("ss" in label for label in re.findall(r'data-group="category" data-label="([^"]+)"', found))
    assert client.get("/?find.category=" + "x" * 101).status_code == 400
    monkeypatch.setattr(facets, "FACET_ROWS", 40)
    assert 'name="find.category"' not in client.get("/").get_data(as_text=True)


def test_facet_counts_follow_the_other_groups_filters(app):
    facets = app.extensions["retrieval"].index().get().facets
    filters = {"colours": ["red", "blue"], "gender": ["women"]}
    counts = facets.counts(filters, "")
    for row in counts["gender"]:  # a gender count ignores the gender filter itself
        assert row["count"] == len(facets.select({"colours": ["red", "blue"], "gender": [row["label"]]}))
    for row in counts["colours"]:
        assert row["count"] == len(facets.select({"colours": [row["label"]], "gender": ["women"]}))
    assert [r["label"] for r in counts["gender"] if r["selected"]] == ["women"]


def test_product_page_shows_scores_and_shared_labels(client):
    html = client.get("/items/3?view=group-colours&k=6").get_data(as_text=True)
    assert html.count('class="score"') == 6 and "chip shared" in html and 'class="segment active"' in html
    assert "group head's agreement" in html  # a group view's score is no cosine of embeddings
    assert "the shared view's similarity" in client.get("/items/3").get_data(as_text=True)
    assert client.get("/items/999").status_code == 404


def test_photo_search_page_redirects_to_filterable_results(client, web_data):
    response = upload(client, catalog_photo(web_data), url="/search?gender=women")
    assert response.status_code == 303 and "gender=women" in response.headers["Location"]
    html = client.get(response.headers["Location"]).get_data(as_text=True)
    assert "What the model sees" in html and html.count('class="score"') == 24
    query_url = response.headers["Location"].split("?")[0]
    assert client.get(f"{query_url}/query.jpg").content_type == "image/jpeg"
    expired = client.get("/search/expired?gender=women&view=group-colours")
    assert expired.status_code == 404 and "has expired" in expired.get_data(as_text=True)
    # it offers photo search again with the search's filters and view, beside the catalogue
    assert 'href="/search?gender=women&amp;view=group-colours">Search by photo again' in expired.get_data(as_text=True)
    assert "Search by photo again" not in client.get("/items/999").get_data(as_text=True)
    bad = upload(client, b"nope", url="/search")
    assert bad.status_code == 400 and "not an image" in bad.get_data(as_text=True) and not bad.is_json


def test_evaluation_page(web_data, web_report, tmp_path):
    html = create_app(make_config(web_data, tmp_path)).test_client().get("/evaluation").get_data(as_text=True)
    assert "No evaluation report is configured" in html
    missing = create_app(make_config(web_data, tmp_path, REPORT_DIR=str(tmp_path / "none"))).test_client()
    assert "retrieval evaluate" in missing.get("/evaluation").get_data(as_text=True)
    client = create_app(make_config(web_data, tmp_path, REPORT_DIR=str(web_report))).test_client()
    html = client.get("/evaluation").get_data(as_text=True)
    assert "colours" in html and "mean" in html and "mAP@10" in html
    assert client.get("/evaluation/chart.png").content_type == "image/png"
    # a report of another model than the index serves: said on the page
    other = tmp_path / "other"
    other.mkdir()
    report = json.loads((web_report / "report.json").read_text())
    report["settings"]["fingerprint"] = "f" * 64
    (other / "report.json").write_text(json.dumps(report))
    html = create_app(make_config(web_data, tmp_path, REPORT_DIR=str(other))).test_client().get("/evaluation")
    assert "This report is of model ffffffffffff; the index serves model" in html.get_data(as_text=True)
    assert "the index serves" not in client.get("/evaluation").get_data(as_text=True)
    # a report.json that is there but unreadable was "No report.json yet", a hand-edited one a 500
    bad = tmp_path / "bad"
    bad.mkdir()
    for content in (b"\xff\xfe", b'{"settings": {}, "groups": [], "mean": {}}'):
        (bad / "report.json").write_bytes(content)
        page = create_app(make_config(web_data, tmp_path, REPORT_DIR=str(bad))).test_client().get("/evaluation")
        assert page.status_code == 200 and "cannot be read" in page.get_data(as_text=True)


# ---- hot reload and startup -------------------------------------------------------------------

def test_rebuilt_index_is_picked_up_without_restart(web_data, tmp_path):
    index = copy_index(web_data, tmp_path)
    client = create_app(make_config(web_data, tmp_path, INDEX_DIR=str(index))).test_client()
    assert client.get("/api/health").get_json()["index_size"] == 60
    build_index(web_data["emb"], web_data["catalog"], index, keep=range(40))  # atomic swap, like rebuild_index.sh
    assert client.get("/api/health").get_json()["index_size"] == 40
    assert client.get("/api/items/50").status_code == 404


def test_reload_under_load_fails_no_request(web_data, tmp_path):
    from web.serve import start_background_server

    index = copy_index(web_data, tmp_path)
    server = start_background_server(create_app(make_config(web_data, tmp_path, INDEX_DIR=str(index))))
    url = server.url
    statuses, stop = [], threading.Event()

    def hammer():
        while not stop.is_set():
            with urllib.request.urlopen(f"{url}/api/items/1/similar?k=5") as response:
                statuses.append(response.status)

    def served_more_than(n: int, timeout: float = 60.0) -> None:
        """Wait for the hammer to finish more requests (a loaded machine can be slow to start)."""
        deadline = time.monotonic() + timeout
        while len(statuses) <= n and time.monotonic() < deadline:
            time.sleep(0.05)

    worker = threading.Thread(target=hammer)
    try:
        worker.start()
        served_more_than(0)
        for keep in (range(30), range(60), range(45)):
            build_index(web_data["emb"], web_data["catalog"], index, keep=keep)
            served_more_than(len(statuses))  # requests really ran against each new index
        stop.set()
        worker.join(10)
        with urllib.request.urlopen(f"{url}/api/health") as response:
            assert json.load(response)["index_size"] == 45
    finally:
        stop.set()
        server.close()
    assert statuses and set(statuses) == {200}


def test_mismatched_rebuild_keeps_serving_the_old_index(web_data, tmp_path):
    index = copy_index(web_data, tmp_path)
    client = create_app(make_config(web_data, tmp_path, INDEX_DIR=str(index))).test_client()
    assert client.get("/api/health").status_code == 200
    sidecar = json.loads((index / "sidecar.json").read_text())
    (index / "sidecar.json").write_text(json.dumps({**sidecar, "fingerprint": "0" * 64}))
    body = client.get("/api/health").get_json()
    assert body["index_size"] == 60 and "fingerprint" in body["reload_error"]


def test_serve_refuses_an_index_of_another_model(web_data, tmp_path, capsys, monkeypatch):
    import torch

    import web.serve
    from retrieval.cli import main as cli

    monkeypatch.setattr(web.serve, "use_one_thread_per_search", lambda: None)  # keep FAISS threads for others

    ckpt = torch.load(web_data["checkpoint"], weights_only=False)
    torch.save({**ckpt, "fingerprint": "f" * 64}, tmp_path / "other.pt")
    code = cli(["serve", "--index", str(web_data["index"]), "--catalog", str(web_data["catalog"]),
                "--checkpoint", str(tmp_path / "other.pt"), "--port", "0"])
    assert code == 1 and "fingerprint mismatch" in capsys.readouterr().err


def test_serve_prints_its_address(web_data, tmp_path, monkeypatch, capsys):
    import web.serve

    made = []

    def fake_server(app, host, port, threads, limits):
        made.append((app, host, port, threads, limits))
        return type("Server", (), {"effective_port": 8123, "run": lambda self: None, "close": lambda self: None})()

    monkeypatch.setattr(web.serve, "make_server", fake_server)
    monkeypatch.setattr(web.serve, "use_one_thread_per_search", lambda: None)
    assert web.serve.main(["--index", str(web_data["index"]), "--catalog", str(web_data["catalog"]),
                           "--cache-dir", str(tmp_path), "--threads", "2", "--channel-timeout", "7"]) == 0
    assert "http://127.0.0.1:8123/" in capsys.readouterr().out and made[0][3] == 2
    assert made[0][4].channel_timeout == 7 and made[0][4].connection_limit == web.serve.ServerLimits().connection_limit
    with pytest.raises(ValueError, match="--backlog must be at least 1"):
        web.serve.main(["--index", str(web_data["index"]), "--catalog", str(web_data["catalog"]), "--backlog", "0"])


def test_a_link_of_labels_holding_commas_reads_back_as_those_labels(app):
    # 'a, b' joined with 'sport' by commas read as three labels: every facet link of such a label was a 400
    from urllib.parse import parse_qsl, urlsplit

    from werkzeug.datastructures import MultiDict

    from web import params

    vocab = {"Farbe/Größe %": ["a, b", "sport", "x"], "gender": ["men", "women"]}
    filters = {"Farbe/Größe %": ["a, b"], "gender": ["men", "women"]}
    for link in params.toggle_links("/", filters, "Farbe/Größe %", ["sport", "a, b", "x"]):
        query = MultiDict(parse_qsl(urlsplit(link).query))
        with app.test_request_context():
            got = params.parse_filters(query, vocab)
        assert got["gender"] == ["men", "women"] and got.get("Farbe/Größe %", []) in (
            ["a, b", "sport"], [], ["a, b", "x"]), (link, got)
    query = MultiDict(parse_qsl(params.query_string({"Farbe/Größe %": ["a, b", "sport"]})[1:]))
    with app.test_request_context():
        assert params.parse_filters(query, vocab) == {"Farbe/Größe %": ["a, b", "sport"]}


def test_links_keep_the_pages_k_per_page_and_view(client):
    # facet links and "Clear all" dropped per_page on browse and k on the product and results pages;
    # the photo search form dropped view
    import re

    html = client.get("/?per_page=2&gender=women").get_data(as_text=True)
    facet_links = re.findall(r'href="(/\?[^"]*)"', html)
    assert facet_links and all("per_page=2" in link for link in facet_links if "page=" not in link.replace("per_page", ""))
    html = client.get("/items/3?k=3&view=group-colours").get_data(as_text=True)
    links = re.findall(r'href="(/items/3(?:\?[^"]*)?)"', html)  # this product's own links
    assert links and [link for link in links if "k=3" not in link] == []
    form = client.get("/search?view=group-colours").get_data(as_text=True)
    assert re.search(r'action="/search\?view=group-colours"', form)


def test_group_names_show_as_written_but_the_first_letter():
    from web import group_title

    assert group_title("Farbe/Größe %") == "Farbe/Größe %"  # capitalize gave 'Farbe/größe %'
    assert group_title("baseColour") == "BaseColour" and group_title("sleeve_length") == "Sleeve length"


def test_serve_on_a_port_in_use_or_out_of_range_is_one_line(web_data, tmp_path, capsys):
    # a 27-line traceback (Address already in use); --port 70000 wrapped round to 4464
    import socket

    from retrieval.cli import main as cli

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        assert cli(["serve", "--index", str(web_data["index"]), "--catalog", str(web_data["catalog"]),
                    "--cache-dir", str(tmp_path), "--port", str(port)]) == 1
        assert f"cannot listen on 127.0.0.1:{port} (" in capsys.readouterr().err
    finally:
        taken.close()
    with pytest.raises(SystemExit):
        cli(["serve", "--index", "i", "--catalog", "c", "--port", "70000"])
    assert "argument --port: 70000 is not a port (0 to 65535)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["serve", "--index", "i", "--catalog", "c", "--port", "80a"])
    assert "argument --port: '80a' is not a port number" in capsys.readouterr().err
    # --audit of a folder without issues.csv started, its nav link answering 503; --review without --audit
    for extra, message in ((["--audit", str(tmp_path / "none")], "no issues.csv there"),
                           (["--review"], "--review needs --audit AUDIT_DIR")):
        assert cli(["serve", "--index", str(web_data["index"]), "--catalog", str(web_data["catalog"]), *extra]) == 1
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("filters", [{}, {"gender": ["women"]}, {"category": ["dress", "t-shirt"], "gender": ["men"]},
                                     {"colours": ["red, white"], "pattern": ["plain"]}, {"view": ["back"], "q": ["x"]}])
def test_facet_links_equal_one_link_per_toggled_label(app, filters):
    from functools import partial

    from flask import url_for

    from web import params
    from web.views import link_to

    labels = ["women", "men", "dress", "plain", "red, white", "a&b"]
    with app.test_request_context():
        for endpoint, route, extra in (("views.browse", {}, {"q": "blue top"}), ("views.product", {"item_id": 3}, {})):
            link = partial(link_to, endpoint, route, **extra)
            for group in ("gender", "category", "colours", "new", "view", "k"):
                expected = [link(params.toggled(filters, group, label)) for label in labels]
                assert params.toggle_links(url_for(endpoint, **route), filters, group, labels, **extra) == expected


def test_an_earlier_upload_searches_an_index_rebuilt_with_the_other_shared_view(web_data, tmp_path):
    """A query remembered before the index was rebuilt with --shared-view embedding (same model) is
    searched as the new index's shared view holds, the same as uploading the photo again."""
    from retrieval.cli import main as cli

    index = copy_index(web_data, tmp_path)
    client = create_app(make_config(web_data, tmp_path, INDEX_DIR=str(index))).test_client()
    first = upload(client, catalog_photo(web_data), k="5").get_json()
    assert client.get("/api/health").get_json()["shared_view"] == "matches"
    assert cli(["index", "build", "--embeddings", str(web_data["emb"]), "--out", str(index), "--shared-view",
                "embedding"]) == 0
    assert client.get("/api/health").get_json()["shared_view"] == "embedding"
    again = client.get(f"/api/search/{first['query_id']}?k=5")
    fresh = upload(client, catalog_photo(web_data), k="5").get_json()
    assert again.status_code == 200
    assert [r["id"] for r in again.get_json()["results"]] == [r["id"] for r in fresh["results"]]
    assert np.allclose([r["score"] for r in again.get_json()["results"]], [r["score"] for r in fresh["results"]],
                       atol=1e-5)


def test_search_by_photo_on_a_matches_index_and_a_with_groups_one(web_data, tmp_path):
    """On the default ``matches`` index an upload is ranked by the plain inner product of its own
    matches vector; after a rebuild from ``embed --shared-view with-groups`` by the cosine of its
    with-groups vector, and a query remembered before the rebuild searches as a fresh upload does."""
    from PIL import Image

    from retrieval.cli import main as cli
    from retrieval.data.embfile import read_embeddings
    from retrieval.embed.inference import describe_image
    from web.resources import ModelHolder

    index = copy_index(web_data, tmp_path)
    client = create_app(make_config(web_data, tmp_path, INDEX_DIR=str(index))).test_client()
    model = ModelHolder(web_data["checkpoint"]).get()[0]
    photo = Image.open(io.BytesIO(catalog_photo(web_data)))
    first = upload(client, catalog_photo(web_data), k="5").get_json()
    for view, emb in (("matches", web_data["emb"]), ("with-groups", tmp_path / "with-groups.h5")):
        if view != "matches":
            assert cli(["embed", "--checkpoint", str(web_data["checkpoint"]), "--catalog", str(web_data["catalog"]),
                        "--out", str(emb), "--device", "cpu", "--workers", "0", "--shared-view", view]) == 0
            assert cli(["index", "build", "--embeddings", str(emb), "--out", str(index)]) == 0
        assert client.get("/api/health").get_json()["shared_view"] == view
        fresh = upload(client, catalog_photo(web_data), k="5").get_json()
        query = describe_image(model, photo, shared_view=view).vectors[0]
        assert (abs(np.linalg.norm(query) - 1) > 1e-3) == (view == "matches")  # only matches is not unit length
        scores = read_embeddings(emb).vectors @ query
        assert [r["id"] for r in fresh["results"]] == np.argsort(-scores, kind="stable")[:5].tolist()
        assert np.allclose([r["score"] for r in fresh["results"]], np.sort(scores)[::-1][:5], atol=1e-4)
        again = client.get(f"/api/search/{first['query_id']}?k=5").get_json()
        assert [r["id"] for r in again["results"]] == [r["id"] for r in fresh["results"]]


def test_query_group_vector_follows_the_index_rule():
    """A photo's vectors are made as the index's rows are: the group view with the power the index
    records (one that records none, built before the rule, the cosine's), the shared view with the
    model's group weights."""
    from web.search import Query

    p = np.array([[0.6, 0.8, 0.0]], dtype=np.float32)  # |p| = 1.0 would hide the power: scale it
    query = Query(embedding=np.ones((1, 4), np.float32), probs={"colour": 2 * p, "kind": p},
                  sigmoid_groups=("colour",), predicted={}, labels={}, thumbnail=b"", own_shared_view="matches")
    assert np.allclose(query.vector("group-colour", "matches", 0.5), 2 * p / np.sqrt(2.0))
    assert np.allclose(query.vector("group-colour", "matches", None), p)  # the cosine: unit length
    assert np.allclose(query.vector("group-kind", "matches", 0.5), p)  # a softmax group is never scaled

    # the shared view weighs the groups as the model (which embedded the index) does
    from retrieval.data.embfile import shared_vectors
    query.shared_view_weights = {"colour": 0.5, "kind": 1.5}
    assert np.allclose(query.vector("shared", "matches"),
                       shared_vectors(query.embedding, query.probs, ("colour",), "matches", {"colour": 0.5, "kind": 1.5}))
    assert not np.allclose(query.vector("shared", "matches"), shared_vectors(query.embedding, query.probs, ("colour",),
                                                                            "matches"))


def test_a_group_named_like_a_parameter_filters_as_filter_dot_its_name():
    """A group called view, k, q, page or per_page (a photo's view: front, back) is filtered by
    filter.<group>, so that ?view= still picks the index view; filter.<group> works for any group."""
    from werkzeug.datastructures import MultiDict

    from web import params

    vocab = {"view": ["back", "front"], "colour": ["red", "blue"]}
    args = MultiDict([("view", "group-colour"), ("k", "5"), ("filter.view", "back"), ("colour", "red"),
                      ("filter.colour", "blue")])
    assert params.parse_filters(args, vocab) == {"view": ["back"], "colour": ["red", "blue"]}
    assert params.parse_view(args, ["shared", "group-colour", "group-view"]) == "group-colour"
    assert params.query_string({"view": ["back", "front"], "colour": ["red"]}, view="group-view") == \
        "?filter.view=back%2Cfront&colour=red&view=group-view"
    assert params.parse_filters(MultiDict([("view", "shared")]), vocab) == {}


def test_thumbs_prune_deletes_what_no_indexed_image_shows_now(web_data, tmp_path):
    # a week of withdrawn products and photos shot again left 11 of 116 cached thumbnails of images
    # no longer indexed or changed since, and nothing ever removed them
    import os

    from web import create_app
    from web_fixtures import make_config

    catalog = tmp_path / "catalog"
    shutil.copytree(web_data["catalog"], catalog)
    runner = create_app(make_config(web_data, tmp_path, CATALOG_DIR=str(catalog))).test_cli_runner()
    assert "60 thumbnails" in runner.invoke(args=["thumbs"]).output
    thumbs = tmp_path / "thumbs"
    before = set(thumbs.glob("*/*.jpg"))
    assert len(before) == 60
    shot = next(p for p in sorted(catalog.rglob("*")) if p.suffix in (".jpg", ".png"))
    os.utime(shot, ns=(1, 1))  # a photo shot again: its thumbnail is made anew, the old one is stale
    (thumbs / "ab").mkdir(exist_ok=True)
    (thumbs / "ab" / ("ab" + "0" * 38 + ".jpg")).write_bytes(b"x")  # a withdrawn product's
    (thumbs / "notes.txt").write_text("kept")  # not the cache's: left alone
    result = runner.invoke(args=["thumbs", "--prune"])
    assert "60 thumbnails" in result.output and "Pruned 2 cached images" in result.output, result.output
    after = set(thumbs.glob("*/*.jpg"))
    assert len(after) == 60 and len(after - before) == 1 and (thumbs / "notes.txt").is_file()
    assert all(any(folder.iterdir()) for folder in thumbs.iterdir() if folder.is_dir())  # emptied ones removed

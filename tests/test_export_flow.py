"""A retailer's export as it comes out of a spreadsheet runs through the whole flow: semicolons, a
byte-order mark, backslash paths, a SKU column, trailing unnamed columns, colours spelled two ways,
large JPEGs, an EXIF-rotated and a broken photo. Each piece has its own test (test_catalog.py,
test_images.py); this one checks that they hold together from catalog-info to evaluate."""
import csv
import json

import numpy as np
from PIL import Image

from conftest import TINY
from retrieval.cli import main as cli
from retrieval.data.catalog import read_catalog


def export_of(demo, out):
    """The demo catalog written as a messy export: 640 px JPEGs (decoded at 1/2 scale for 64 px)."""
    rows = list(csv.DictReader(open(demo / "labels.csv", encoding="utf-8")))
    (out / "photos").mkdir(parents=True)
    lines = ["image;split;title;sku;category;colours;pattern;gender;;"]
    for i, row in enumerate(rows):
        img = Image.open(demo / row["image"]).convert("RGB").resize((640, 640), Image.BICUBIC)
        name = f"photos/{i:03d}.jpg"
        if i == 3:  # stored sideways, shown upright by its EXIF orientation
            exif = img.getexif()
            exif[0x0112] = 6
            img.rotate(90, expand=True).save(out / name, quality=90, exif=exif)
        else:
            img.save(out / name, quality=90)
        colours = row["colours"].replace("black", "Black" if i % 3 else "black")  # two spellings
        lines.append(";".join([name.replace("/", "\\"), row["split"], row["title"], f"SKU-{i:05d}", row["category"],
                               colours, row["pattern"], row["gender"], "", ""]))
    (out / "photos" / "999.jpg").write_bytes(b"\xff\xd8 cut off")
    lines.append("photos\\999.jpg;train;Broken;SKU-99999;shirt;red;plain;men;;")
    (out / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8-sig")
    return out


def test_a_spreadsheet_export_runs_from_catalog_info_to_evaluate(demo_catalog, tmp_path, capsys, caplog):
    export = export_of(demo_catalog, tmp_path / "export")
    catalog = read_catalog(export)
    assert catalog.groups == ["category", "colours", "pattern", "gender"] and "sku" in catalog.left_out
    assert "Black" in catalog.vocab["colours"] and "black" not in catalog.vocab["colours"]
    assert catalog.items[0].image == "photos/000.jpg"
    assert cli(["catalog-info", str(export), "--verify-images"]) == 1  # the broken photo
    out = capsys.readouterr().out
    assert "left out: group 'sku' (an identifier or free text" in out and "photos/999.jpg: cannot read image" in out
    run, emb = tmp_path / "run", tmp_path / "emb.h5"
    assert cli(["train", "--catalog", str(export), "--out", str(run), "--epochs", "2", *TINY]) == 0
    assert "1 unreadable training images were skipped: photos/999.jpg" in caplog.text
    assert cli(["embed", "--checkpoint", str(run / "best.pt"), "--catalog", str(export), "--out", str(emb),
                "--trunk-cache", str(run / "trunk-cache.h5"), "--workers", "0"]) == 0
    assert cli(["evaluate", "--embeddings", str(emb), "--catalog", str(export), "--out", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert set(report["groups"]) == {"category", "colours", "pattern", "gender"}
    assert np.isfinite(report["mean"]["map_paper"]) and report["groups"]["colours"]["queries"] > 0


def test_group_names_as_retailers_write_them_run_through_index_evaluation_and_web(demo_catalog, tmp_path):
    """Headers with spaces, '/', '%', letters outside ASCII, a lone '.' and a web parameter's name
    ('view') name groups like any other: EMB.h5 keeps them (the HDF5 path separator escaped), the index
    gives every view a file of its own, the evaluation's class chart a file, and the web's views and
    filters take them (the 'view' group's filter as filter.view). One photo is a phone's HEIC."""
    import io
    import os
    import shutil
    import urllib.parse

    from indexer import IndexStore
    from indexer.persist import view_file
    from retrieval.data.embfile import read_embeddings, read_probabilities
    from web import create_app

    names = {"category": "Product Type", "colours": "Colour/Color", "pattern": "view",
             "sleeve": "Ärmel 100% ✓", "gender": "."}
    export = tmp_path / "export"
    shutil.copytree(demo_catalog, export, copy_function=os.link)
    lines = (export / "labels.csv").read_text(encoding="utf-8").splitlines()
    (export / "labels.csv").unlink()  # a hard link of the demo catalog's: written anew, not through it
    header = lines[0].split(",")
    photo = lines[5].split(",")[0]  # one photo as a phone takes it: HEIC (written anew, not through the link)
    Image.open(export / photo).save(export / "phone.heic", "HEIF")
    lines[5] = lines[5].replace(photo, "phone.heic", 1)
    (export / "labels.csv").write_text("\n".join([",".join(names.get(h, h) for h in header), *lines[1:]]) + "\n",
                                       encoding="utf-8")
    assert read_catalog(export).groups == list(names.values())
    run, emb, index = tmp_path / "run", tmp_path / "emb.h5", tmp_path / "index"
    assert cli(["train", "--catalog", str(export), "--out", str(run), "--epochs", "2", *TINY]) == 0
    assert cli(["embed", "--checkpoint", str(run / "best.pt"), "--catalog", str(export), "--out", str(emb),
                "--trunk-cache", str(run / "trunk-cache.h5"), "--workers", "0"]) == 0
    embeddings = read_embeddings(emb)
    assert set(embeddings.group_vectors) == set(names.values()) == set(embeddings.attrs["groups"])
    assert set(read_probabilities(emb, np.arange(3))) == set(names.values())

    assert cli(["index", "build", "--embeddings", str(emb), "--out", str(index), "--catalog", str(export)]) == 0
    views = ["shared", *(f"group-{g}" for g in names.values())]
    assert sorted(p.name for p in index.glob("*.faiss")) == sorted(view_file(index, v).name for v in views)
    assert view_file(index, "group-Colour/Color").name == "group-Colour%2FColor.faiss"
    assert set(IndexStore.load(index).views) == set(views)

    report = tmp_path / "report"
    assert cli(["evaluate", "--embeddings", str(emb), "--catalog", str(export), "--out", str(report),
                "--class-chart", "Colour/Color"]) == 0
    assert (report / "class_Colour%2FColor.png").is_file()
    assert set(json.loads((report / "report.json").read_text())["groups"]) == set(names.values())

    client = create_app({"TESTING": True, "INDEX_DIR": str(index), "CATALOG_DIR": str(export),
                         "CHECKPOINT": str(run / "best.pt"), "THUMB_DIR": str(tmp_path / "thumbs"),
                         "INDEX_CHECK_INTERVAL": 0}).test_client()
    for view in views:
        answer = client.get(f"/api/items/0/similar?{urllib.parse.urlencode({'view': view, 'k': 5})}")
        assert answer.status_code == 200 and answer.json["view"] == view and answer.json["results"]
    label = read_catalog(export).items[0].labels["Product Type"][0]
    answer = client.get(f"/api/items/1/similar?{urllib.parse.urlencode({'Product Type': label, 'view': 'group-.'})}")
    assert answer.status_code == 200 and answer.json["results"]
    assert all(label in r["labels"]["Product Type"] for r in answer.json["results"])
    assert client.get(f"/items/0?{urllib.parse.urlencode({'view': 'group-Colour/Color'})}").status_code == 200
    shown = read_catalog(export).items[2].labels["view"][0]
    answer = client.get(f"/api/items/1/similar?{urllib.parse.urlencode({'filter.view': shown, 'view': 'group-view'})}")
    assert answer.status_code == 200 and answer.json["view"] == "group-view" and answer.json["filters"] == {"view": [shown]}
    assert answer.json["results"] and all(shown in r["labels"]["view"] for r in answer.json["results"])
    heic = client.get("/images/phone.heic")  # browsers do not show HEIC: a JPEG copy
    assert heic.status_code == 200 and heic.mimetype == "image/jpeg" and Image.open(io.BytesIO(heic.data)).size == (64, 64)
    assert client.get("/images/" + read_catalog(export).items[0].image).mimetype == "image/jpeg"  # as it is
    page = client.get(f"/?{urllib.parse.urlencode({'filter.view': shown})}")
    assert page.status_code == 200 and f"filter.view={urllib.parse.quote_plus(shown)}".encode() in page.data

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
    assert cli(["catalog-info", str(export), "--verify-images"]) == 0
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

"""Catalog parsing: good input, each bad case, the hash split and the summary."""
import pytest

from conftest import write_catalog
from retrieval.catalog import CatalogError, hash_split, parse_labels, read_catalog, summarize_catalog
from retrieval.cli import main as cli


def test_reads_groups_labels_and_multi_label(tmp_path):
    root = write_catalog(tmp_path, ["a.jpg,train,Red dress,red|white,dress", "b.jpg,test,,,shirt",
                                    "sub/c.jpg,train,Blue,blue,dress"])
    cat = read_catalog(root)
    assert cat.groups == ["colour", "type"]
    assert cat.items[0].labels == {"colour": ("red", "white"), "type": ("dress",)}
    assert cat.items[1].labels["colour"] == ()  # empty = unknown
    assert cat.items[2].row_id == 2 and cat.items[2].image == "sub/c.jpg"
    assert cat.vocab == {"colour": ["blue", "red", "white"], "type": ["dress", "shirt"]}
    assert cat.multi_label_groups() == ["colour"]
    assert [it.image for it in cat.split_items("test")] == ["b.jpg"]


def test_missing_split_column_uses_hash(tmp_path):
    names = [f"img{i}.jpg" for i in range(200)]
    root = write_catalog(tmp_path, [f"{n},x" for n in names], header="image,colour")
    cat = read_catalog(root)
    assert [it.split for it in cat.items] == [hash_split(n) for n in names]
    share = sum(it.split == "test" for it in cat.items) / len(names)
    assert 0.1 < share < 0.3


@pytest.mark.parametrize("header,rows,images,message", [
    ("", [], [], "missing header"),
    ("colour,type", ["red,dress"], [], "missing header"),
    ("image,split,colour", ["a.jpg,validation,red"], ["a.jpg"], "line 2: unknown split 'validation'"),
    ("image,split,colour", ["../x.jpg,train,red"], [], "leaves the catalog directory"),
    ("image,split,colour", ["a.jpg,train,red", "gone.jpg,train,red"], ["a.jpg"], "line 3: image file 'gone.jpg' does not exist"),
    ("image,split,colour", ["a.jpg,train,red", "a.jpg,test,red"], ["a.jpg"], "already listed on line 2"),
    ("image,split", ["a.jpg,train"], ["a.jpg"], "no attribute group"),
    ("image,split,colour", ["a.jpg,train,red,extra"], ["a.jpg"], "more cells than header"),
])
def test_bad_catalogs_name_the_problem(tmp_path, header, rows, images, message):
    root = tmp_path / "cat"
    write_catalog(root, rows, header=header, images=images)
    with pytest.raises(CatalogError, match=message) as err:
        read_catalog(root)
    assert "labels.csv" in str(err.value)


def test_missing_labels_file(tmp_path):
    with pytest.raises(CatalogError, match="not found"):
        read_catalog(tmp_path)


def test_parse_labels_trims_and_dedupes():
    assert parse_labels(" red | white|red|") == ("red", "white")
    assert parse_labels("") == ()


def test_summary_and_cli(tmp_path, capsys):
    root = write_catalog(tmp_path, ["a.jpg,train,,red,dress", "b.jpg,train,,red,shirt", "c.jpg,test,,,dress"])
    summary = {row["group"]: row for row in summarize_catalog(read_catalog(root))}
    assert summary["colour"]["classes"] == 1 and summary["colour"]["labelled"] == pytest.approx(2 / 3)
    assert summary["type"]["largest"] == ("dress", 2) and summary["type"]["smallest"] == ("shirt", 1)
    assert cli(["catalog-info", str(root), "--verify-images"]) == 0
    out = capsys.readouterr().out
    assert "3 items (2 train, 1 test)" in out and "dress (2) / shirt (1)" in out and "0 unreadable" in out


def test_cli_reports_catalog_errors(tmp_path, capsys):
    write_catalog(tmp_path, ["a.jpg,nope,,red,dress"])
    assert cli(["catalog-info", str(tmp_path)]) == 1
    assert "unknown split 'nope'" in capsys.readouterr().err

"""Catalog parsing: good input, each bad case, the hash split and the summary."""
from collections import Counter

import pytest

from conftest import needs_dataset, write_catalog
from retrieval.data.catalog import CatalogError, hash_split, parse_labels, read_catalog, training_catalog
from retrieval.cli import main as cli
from retrieval.data.summary import summarize_catalog


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


def test_an_unclosed_quote_is_named_not_read_as_one_cell_of_the_rows_after_it(tmp_path, monkeypatch):
    from retrieval.data import columns

    # 'catalog-info' said "3 items" of 40 rows, the rest read as a title; a title over two lines still reads
    rows = [f"{i}.jpg,train,Shirt {i},red,dress" for i in range(6)]
    rows[2] = '2.jpg,train,"Shirt 2,red,dress'
    root = write_catalog(tmp_path / "bad", rows, images=[f"{i}.jpg" for i in range(6)])
    with pytest.raises(CatalogError, match=r"labels.csv, line 4: the 'title' cell runs on over 4 lines, holding "
                                           r"the rows after it \(a stray '\"'\?"):
        read_catalog(root)
    monkeypatch.setattr(columns, "read_columns", lambda *a, **k: None)  # the row reader says it too
    with pytest.raises(CatalogError, match=r"labels.csv, line 4: the 'title' cell runs on over 4 lines"):
        read_catalog(root)
    monkeypatch.undo()
    rows[2] = '2.jpg,train,"Shirt 2, blue\nlong sleeves",red,dress'
    cat = read_catalog(write_catalog(tmp_path / "good", rows, images=[f"{i}.jpg" for i in range(6)]))
    assert len(cat.items) == 6 and cat.items[2].title == "Shirt 2, blue\nlong sleeves" and cat.items[3].image == "3.jpg"
    # a description over lines with as many commas as a row has cells, or naming files, is no row (earlier
    # checks refused them)
    text = ("Relaxed-fit tee.\nMade from soft, breathable cotton, with a crew neck, short sleeves, and a curved hem."
            "\ncare.png, wash at 30, do not tumble dry, iron low\nfront.jpg, back.jpg, side.jpg, detail.jpg")
    rows[2] = f'2.jpg,train,"{text}",red,dress'
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(columns, "read_columns", lambda *a, **k: None)
        cat = read_catalog(write_catalog(tmp_path / f"described-{fast}", rows, images=[f"{i}.jpg" for i in range(6)]))
        assert len(cat.items) == 6 and cat.items[2].title == text
    # a title whose second line starts with a catalog file's name, then text: no row (it was refused)
    monkeypatch.undo()
    rows[2] = '2.jpg,train,"Two-pack of tees\n1.jpg, the yellow one, pairs with it",red,dress'
    cat = read_catalog(write_catalog(tmp_path / "pairs", rows, images=[f"{i}.jpg" for i in range(6)]))
    assert len(cat.items) == 6
    # the photos absent (evaluate and index build read without them): an unclosed quote is still named
    rows[2] = '2.jpg,train,"Shirt 2,red,dress'
    bare = write_catalog(tmp_path / "bare", rows, images=[])
    with pytest.raises(CatalogError, match=r"line 4: the 'title' cell runs on over 4 lines"):
        read_catalog(bare, check_files=False)
    # and when the image names have no extension either (sku/1001), by the split column's names
    rows = [f"sku/{1000 + i},train,Shirt {i},red,dress" for i in range(6)]
    rows[2] = 'sku/1002,train,"Shirt 2,red,dress'
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(columns, "read_columns", lambda *a, **k: None)
        bare = write_catalog(tmp_path / f"bare-sku-{fast}", rows, images=[])
        with pytest.raises(CatalogError, match=r"line 4: the 'title' cell runs on over 4 lines"):
            read_catalog(bare, check_files=False)
    # a description line whose cells fall so that a split name lands in the split column, but whose
    # image cell is words, is still no row
    monkeypatch.undo()
    rows[2] = 'sku/1002,train,"Soft tee\nmade for travel, train, or gym,red,dress",red,dress'
    cat = read_catalog(write_catalog(tmp_path / "words", rows, images=[]), check_files=False)
    assert len(cat.items) == 6
    # nor is one whose image cell is one word unlike the row's own image path (a list of sports), the
    # photos there or not (a review of stop 47 found it refused)
    rows = [f"img/{i}.jpg,train,Shirt {i},red,dress" for i in range(6)]
    rows[2] = 'img/2.jpg,train,"Good for:\nrunning,training,stretching,gym,yoga\ngym,train,yoga,relax,rest",red,dress'
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(columns, "read_columns", lambda *a, **k: None)
        for photos in (True, False):
            root = write_catalog(tmp_path / f"sports-{fast}-{photos}", rows,
                                 images=[f"img/{i}.jpg" for i in range(6)] if photos else [])
            assert len(read_catalog(root, check_files=photos).items) == 6


@pytest.mark.parametrize("fast", [True, False])
def test_a_validation_split_is_read_by_its_usual_names(tmp_path, monkeypatch, fast):
    from retrieval.data import catalog, columns

    if not fast:
        monkeypatch.setattr(columns, "read_columns", lambda *a, **k: None)  # the row reader
    cells = ["Train", "val", "Validation", "VALID", "dev", "test", "Testing", "training"]
    root = write_catalog(tmp_path, [f"{i}.jpg,{cell},,red,dress" for i, cell in enumerate(cells)])
    cat = read_catalog(root)
    assert [it.split for it in cat.items] == ["train", "val", "val", "val", "val", "test", "test", "train"]
    assert [it.image for it in cat.split_items("val")] == ["1.jpg", "2.jpg", "3.jpg", "4.jpg"]
    assert catalog.SPLITS == ("train", "val", "test")
    from retrieval.data.summary import format_summary

    assert "8 items (2 train, 4 val, 2 test), 2 groups" in format_summary(cat)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("delimiter", [",", ";"])
def test_reserved_column_names_in_any_letter_case(tmp_path, monkeypatch, fast, delimiter):
    # 'Split' was an attribute group (labels train / test) and the split the hash one; 'Image' was
    # "missing header"
    from retrieval.data import columns

    if not fast:
        monkeypatch.setattr(columns, "read_columns", lambda *a, **k: None)
    rows = [f"{i}.jpg{delimiter}{split}{delimiter}T{i}{delimiter}red" for i, split in enumerate(["train", "test", "TEST"])]
    root = write_catalog(tmp_path, rows, header=delimiter.join(["Image", " SPLIT", "Title", "Colour"]),
                         images=["0.jpg", "1.jpg", "2.jpg"])
    cat = read_catalog(root)
    assert cat.groups == ["Colour"] and [it.split for it in cat.items] == ["train", "test", "test"]
    assert [it.title for it in cat.items] == ["T0", "T1", "T2"]
    (root / "labels.csv").write_text(f"image{delimiter}Image{delimiter}colour\n0.jpg{delimiter}1.jpg{delimiter}red\n")
    with pytest.raises(CatalogError, match=r"duplicate columns \['image'\]"):
        read_catalog(root)


def test_groups_option_names_a_group_with_a_comma():
    from retrieval.data.catalog import group_list

    known = ["Size, EU", "colour", "type"]
    assert group_list("colour,type", known) == ["colour", "type"]
    assert group_list("Size, EU", known) == ["Size, EU"]  # the whole value is one group's name
    assert group_list('"Size, EU", colour', known) == ["Size, EU", "colour"]  # quoted as a CSV cell
    with pytest.raises(ValueError, match="--groups ',' names no group; choose from: 'Size, EU', 'colour'"):
        group_list(",", known)


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
    ("image,split,colour", ["a.jpg,holdout,red"], ["a.jpg"], "line 2: unknown split 'holdout'; expected one of: train, val, test"),
    ("image,split,colour", ["../x.jpg,train,red"], [], "leaves the catalog directory"),
    ("image,split,colour", ["a.jpg,train,red", "gone.jpg,train,red"], ["a.jpg"], "line 3: image file 'gone.jpg' does not exist"),
    ("image,split,colour", ["a.jpg,train,red", "https://cdn.example.com/b.jpg,train,red"], ["a.jpg"],
     "line 3: image file 'https://cdn.example.com/b.jpg' does not exist .*web addresses are not downloaded"),
    ("image,split,colour", ["a.jpg,train,red", "Photos/B.JPG,train,red"], ["a.jpg", "photos/b.jpg"],
     "line 3: image file 'Photos/B.JPG' does not exist .*'photos/b.jpg' differs only in letter case"),
    ("image,split,colour", ["a.jpg,train,red", "photos/c.jpg,train,red"], ["a.jpg", "photos/b.jpg"],
     "line 3: image file 'photos/c.jpg' does not exist under [^;]*$"),
    ("image,split,colour", ["a.jpg,train,red", "photos,train,red"], ["a.jpg", "photos/b.jpg"],
     "line 3: image file 'photos' does not exist under .*; it is a folder, not an image file$"),  # was: "'photos'
    # differs only in letter case"
    ("image,split,colour", ["a.jpg,train,red", "a.jpg,test,red"], ["a.jpg"], "already listed on line 2"),
    ("image,split,colour", ["sub/a.jpg,train,red", "./sub//a.jpg,test,red"], ["sub/a.jpg"],
     "line 3: image 'sub/a.jpg' already listed on line 2"),  # one image under two spellings
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
    # 256 + 3 x 3 labels (red; dress, shirt) = 265 float32 values an item, 3 items
    assert "a trained model's EMB.h5: ~3.2 kB (265 values an item: the embedding's 256 and three for each of the 3 labels)" in out
    assert "many labels" not in out


def test_summary_names_a_group_of_many_labels_and_its_cost(tmp_path, monkeypatch):
    from retrieval.data import summary

    root = write_catalog(tmp_path, [f"{i}.jpg,train,,red,type {i}" for i in range(12)])
    monkeypatch.setattr(summary, "WIDE_GROUP", 10)
    text = summary.format_summary(read_catalog(root))
    assert "many labels: 'type' (12); each label is a value of every item in EMB.h5" in text
    assert "~14 kB (295 values an item: the embedding's 256 and three for each of the 13 labels)" in text


def test_cli_reports_catalog_errors(tmp_path, capsys):
    write_catalog(tmp_path, ["a.jpg,nope,,red,dress"])
    assert cli(["catalog-info", str(tmp_path)]) == 1
    assert "unknown split 'nope'" in capsys.readouterr().err


def test_non_utf8_file_names_file_and_line(tmp_path, capsys):
    # UTF-8 ('Crème brûlée' in its two-byte forms) with one byte that is not: no guess, the line is named
    root = write_catalog(tmp_path, ["a.jpg,train,Cr\u00e8me br\u00fbl\u00e9e,red,dress", "b.jpg,train,Caf\u00e9,red,dress"])
    data = (root / "labels.csv").read_bytes()
    (root / "labels.csv").write_bytes(data.replace("Caf\u00e9".encode(), b"Caf\xe9"))
    with pytest.raises(CatalogError, match=r"labels.csv, line 3: byte 0xe9 at column 16 is not UTF-8; re-save"):
        read_catalog(root)
    assert cli(["catalog-info", str(root)]) == 1
    assert "line 3" in capsys.readouterr().err


def test_a_windows_spreadsheets_csv_reads_as_windows_1252_with_a_warning(tmp_path, caplog):
    # Excel's plain "CSV" on Windows: 'é' is one byte 0xe9, '€' 0x80, 'œ' 0x9c; every letter reads right
    root = write_catalog(tmp_path, ["a.jpg,train,Plain,red,dress", "b.jpg,train,Caf\u00e9 \u20ac5,c\u0153ur,robe"])
    (root / "labels.csv").write_bytes((root / "labels.csv").read_text().encode("cp1252"))
    cat = read_catalog(root)
    assert cat.items[1].title == "Caf\u00e9 \u20ac5" and cat.vocab["colour"] == ["c\u0153ur", "red"]
    assert "is not UTF-8: read as Windows-1252" in caplog.text and "line 3 reads 'b.jpg,train,Caf\u00e9" in caplog.text
    # a byte Windows-1252 has no letter for (0x81) is no such file: the byte is named
    (root / "labels.csv").write_bytes((root / "labels.csv").read_bytes().replace(b"\xe9", b"\x81"))
    with pytest.raises(CatalogError, match=r"line 3: byte 0x81 at column 16 is not UTF-8"):
        read_catalog(root)


@pytest.mark.parametrize("well_formed", [True, False])
@pytest.mark.parametrize("delimiter", [";", "\t"])
def test_a_spreadsheets_export_is_read_as_the_csv(tmp_path, monkeypatch, delimiter, well_formed):
    # semicolons or tabs between cells (Excel's CSV in many locales, a tab-separated export) and
    # Windows backslashes in the image paths: the same catalog as the comma-separated original
    from retrieval.data import columns

    rows = ["a.jpg,train,Red dress,red|white,dress", "sub/b.jpg,test,,,shirt", "sub/c.jpg,train,Blue,blue,dress"]
    want = read_catalog(write_catalog(tmp_path / "csv", rows))
    rows = [r.replace("train", "Train").replace("test", "TEST") for r in rows]  # splits as spreadsheets write them
    root = write_catalog(tmp_path / "export", [r.replace(",", delimiter).replace("/", "\\") for r in rows],
                         header=f"image{delimiter}split{delimiter}title{delimiter}colour{delimiter}type",
                         images=["a.jpg", "sub/b.jpg", "sub/c.jpg"])
    if not well_formed:  # the row-by-row reader
        monkeypatch.setattr(columns, "read_columns", lambda *a: None)
    got = read_catalog(root)
    assert got.groups == want.groups and got.vocab == want.vocab
    assert [(it.image, it.split, it.title, it.labels) for it in got.items] == \
        [(it.image, it.split, it.title, it.labels) for it in want.items]


@pytest.mark.parametrize("well_formed", [True, False])
def test_labels_differing_only_in_case_or_spaces_are_one(tmp_path, monkeypatch, caplog, well_formed):
    # 'Black' on 3 items, 'black' on 1, 'BLACK' in a multi-label cell beside 'Black' (one label
    # then); 'Navy  Blue' (2) and 'navy blue' (1); 'Red' untouched
    from retrieval.data import columns

    if not well_formed:
        monkeypatch.setattr(columns, "read_columns", lambda *a: None)
    rows = ["a.jpg,train,,Black,x", "b.jpg,train,,black,x", "c.jpg,train,,Black|BLACK,x", "d.jpg,test,,Black,y",
            "e.jpg,test,,Navy  Blue,y", "f.jpg,train,,navy blue|Red,x", "g.jpg,train,,Navy  Blue,y"]
    cat = read_catalog(write_catalog(tmp_path, rows))
    assert cat.vocab["colour"] == ["Black", "Navy  Blue", "Red"]
    assert [it.labels["colour"] for it in cat.items] == [("Black",)] * 4 + [("Navy  Blue",), ("Navy  Blue", "Red"),
                                                                              ("Navy  Blue",)]
    assert ("group 'colour': labels that differ only in letter case or spaces are one label, the most frequent "
            "spelling: 'Black' for 'BLACK', 'black'; 'Navy  Blue' for 'navy blue'") in caplog.text
    assert "'type'" not in caplog.text


@pytest.mark.parametrize("well_formed", [True, False])
def test_missing_values_as_programs_write_them_are_unknown(tmp_path, monkeypatch, caplog, well_formed):
    # pandas' astype(str) writes nan, SQL NULL, Excel #N/A: unknown like an empty cell, also inside a
    # multi-label cell; N/A and None are labels (a bag's sleeve length, a collar)
    from retrieval.data import columns

    if not well_formed:
        monkeypatch.setattr(columns, "read_columns", lambda *a: None)
    rows = ["a.jpg,train,,nan,N/A", "b.jpg,train,,Red|NaN,None", "c.jpg,test,,NULL,x", "d.jpg,test,,#N/A,x",
            "e.jpg,train,,Red,<NA>", "f.jpg,train,,nan,x", "g.jpg,train,,Red,NAT"]  # NAT: a colour code, kept
    cat = read_catalog(write_catalog(tmp_path, rows))
    assert [it.labels["colour"] for it in cat.items] == [(), ("Red",), (), (), ("Red",), (), ("Red",)]
    assert [it.labels["type"] for it in cat.items] == [("N/A",), ("None",), ("x",), ("x",), (), ("x",), ("NAT",)]
    assert cat.vocab == {"colour": ["Red"], "type": ["N/A", "NAT", "None", "x"]}
    assert ("group 'colour': '#N/A' on 1 item, 'NULL' on 1 item, 'NaN' on 1 item, 'nan' on 2 items read as "
            "unknown, as an empty cell is") in caplog.text
    assert "group 'type': '<NA>' on 1 item read as unknown" in caplog.text


@pytest.mark.parametrize("well_formed", [True, False])
def test_columns_without_a_name_are_ignored_while_empty(tmp_path, monkeypatch, well_formed):
    # a spreadsheet's export with trailing separators: columns with no header name and no value
    from retrieval.data import columns

    if not well_formed:
        monkeypatch.setattr(columns, "read_columns", lambda *a: None)
    rows = ["a.jpg,train,,red,dress,,", "b.jpg,test,,blue,shirt,, "]
    cat = read_catalog(write_catalog(tmp_path / "ok", rows, header="image,split,title,colour,type,,"))
    assert cat.groups == ["colour", "type"] and [it.labels["type"] for it in cat.items] == [("dress",), ("shirt",)]
    rows[1] = "b.jpg,test,,blue,shirt,,oops"
    with pytest.raises(CatalogError, match="labels.csv, line 3: value 'oops' in column 7, which has no name"):
        read_catalog(write_catalog(tmp_path / "bad", rows, header="image,split,title,colour,type,,"))


def test_header_names_are_trimmed(tmp_path):
    root = write_catalog(tmp_path, ["a.jpg,test,Red,red"], header="image, split , title, colour")
    cat = read_catalog(root)
    assert cat.groups == ["colour"] and cat.items[0].split == "test"


@pytest.mark.parametrize("image,message", [
    ("a\x00b.jpg", "not a usable file path"),
    ("/etc/passwd", "is absolute; write it relative to the catalog directory [^(]*$"),
    ("{root}/sub/a.jpg", "is absolute; write it relative to the catalog directory .* \\(here 'sub/a.jpg'\\)"),
    ("sub/../../x.jpg", "leaves the catalog directory"),
    ("sub\\..\\..\\x.jpg", "leaves the catalog directory"),  # a Windows export's separators
])
def test_hostile_image_paths(tmp_path, image, message):
    image = image.format(root=tmp_path)
    root = write_catalog(tmp_path, [f"{image},train,,red,dress"], images=[])
    with pytest.raises(CatalogError, match=f"labels.csv, line 2: image path .* {message}"):
        read_catalog(root)


@pytest.mark.parametrize("well_formed", [True, False])
def test_identifier_columns_are_left_out_and_reported(tmp_path, capsys, caplog, monkeypatch, well_formed):
    # a retailer's export: sku (one per photo) and a description (unique but for one repeat: 39 of
    # 40 items alone) are no attributes; a product id shared by two photos each is one (each photo's
    # relevant item is its pair), and so is a size where 10 of 20 items are alone (not more than half)
    from retrieval.data import columns

    if not well_formed:  # the row-by-row reader counts the labels itself
        monkeypatch.setattr(columns, "read_columns", lambda *a: None)
    rows = [f"{i}.jpg,train,,red,SKU{i},P{i // 2},text {max(i, 1)},{i if i < 10 else 'M'}" for i in range(40)]
    root = write_catalog(tmp_path, rows, header="image,split,title,colour,sku,product,description,size")
    cat = read_catalog(root)
    assert cat.groups == ["colour", "product", "size"] and sorted(cat.left_out) == ["description", "sku"]
    assert cat.left_out["sku"] == ("an identifier or free text, not an attribute: 40 of its 40 labelled items "
                                   "share no label with another item")
    assert "38 of its 40 labelled items" in cat.left_out["description"]  # 'text 1' is on rows 0 and 1
    assert "group 'sku': an identifier or free text" in caplog.text
    assert cli(["catalog-info", str(root)]) == 0
    assert "left out: group 'sku' (an identifier or free text" in capsys.readouterr().out
    # below 20 labelled items a group is kept whatever its labels (nothing to judge from)
    small = write_catalog(tmp_path / "small", rows[:19], header="image,split,title,colour,sku,product,description,size")
    assert read_catalog(small).left_out == {}


def test_empty_group_is_left_out_and_reported(tmp_path, capsys, caplog):
    root = write_catalog(tmp_path, ["a.jpg,train,,red,,x", "b.jpg,test,,blue,,y"],
                         header="image,split,title,colour,season,fit")
    cat = read_catalog(root)
    assert cat.groups == ["colour", "fit"] and cat.left_out == {"season": "no label on any row"}
    assert "'season': no label on any row" in caplog.text
    assert cli(["catalog-info", str(root)]) == 0
    assert "left out: group 'season' (no label on any row)" in capsys.readouterr().out


def test_test_only_group_is_left_out_of_training(tmp_path, capsys, caplog):
    root = write_catalog(tmp_path, ["a.jpg,train,,red,", "b.jpg,test,,blue,slim"],
                         header="image,split,title,colour,fit")
    trained = training_catalog(read_catalog(root))
    assert trained.groups == ["colour"] and "fit" in trained.left_out
    assert "group 'fit' is labelled only in the test split" in caplog.text
    with pytest.raises(CatalogError, match="fit asked for have no label in the train split"):
        training_catalog(read_catalog(root), "colour,fit")
    assert cli(["catalog-info", str(root)]) == 0
    assert "not trained: group 'fit' (labelled only in the test split)" in capsys.readouterr().out


def test_a_group_of_one_label_is_pointed_out(tmp_path, capsys):
    root = write_catalog(tmp_path, ["a.jpg,train,,red,dress", "b.jpg,test,,blue,dress", "c.jpg,train,,red,"])
    assert cli(["catalog-info", str(root)]) == 0
    out = capsys.readouterr().out
    assert "one label: group 'type' (every labelled item is 'dress')" in out and "group 'colour'" not in out


def test_verify_images_lists_paths_relative_to_the_catalog(tmp_path, capsys):
    root = write_catalog(tmp_path, ["a.jpg,train,,red,dress", "sub/b.jpg,train,,red,dress"])
    (root / "sub" / "b.jpg").write_bytes(b"not an image")
    assert cli(["catalog-info", str(root), "--verify-images"]) == 1  # a check that fails
    assert cli(["catalog-info", str(root)]) == 0  # images not decoded: nothing found
    out = capsys.readouterr().out
    assert "1 unreadable images\n  sub/b.jpg: cannot read image" in out


@needs_dataset()
@pytest.mark.dataset
def test_development_catalog_reads_as_its_readme_says():
    from conftest import DATASET

    catalog = read_catalog(DATASET)  # every image file checked
    assert len(catalog) == 9583 and len(catalog.split_items("test")) == 1935
    assert catalog.groups == ["gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "usage"]
    assert len(catalog.vocab["articleType"]) == 75 and catalog.multi_label_groups() == []


TRICKY = ('\ufeffimage, split ,title,colour,type,fit\n'
          'a.jpg,train,"Dress, red",red| white |red,dress,\n'
          '\n'
          ' sub/b.jpg ,test,"two\nlines ""quoted""",,shirt,\n'
          'link/c.jpg,train,,blue,dress,\n')


def tricky_catalog(tmp_path):
    """Quoted commas and newlines, a BOM, a blank line, spaces, repeated labels, an empty group,
    and a directory linked from inside the catalog."""
    root = write_catalog(tmp_path / "cat", [], images=["a.jpg", "sub/b.jpg", "real/c.jpg"])
    (root / "link").symlink_to(root / "real")
    (root / "labels.csv").write_text(TRICKY)
    return root


@pytest.mark.parametrize("check_files", [True, False])
def test_column_reader_reads_as_the_row_reader(tmp_path, check_files):
    from retrieval.data.catalog import _read_rows
    from retrieval.data.columns import read_columns

    root = tricky_catalog(tmp_path)
    groups, items, cells = read_columns(root / "labels.csv", root, check_files)
    want_groups, want_items = _read_rows(root / "labels.csv", root, check_files)
    assert groups == want_groups == ["colour", "type", "fit"]
    assert items == want_items and [it.stat for it in items] == [it.stat for it in want_items]
    assert items[1].title == 'two\nlines "quoted"' and items[0].labels["colour"] == ("red", "white")
    assert cells == {g: Counter(it.labels[g] for it in want_items) for g in groups}  # rows per label tuple
    assert (items[0].stat is not None) == check_files


def test_well_formed_catalog_is_read_column_by_column(tmp_path, monkeypatch):
    from retrieval.data import catalog

    root = tricky_catalog(tmp_path)
    monkeypatch.setattr(catalog, "_read_rows", None)  # the row reader is not called
    cat = read_catalog(root)
    assert cat.groups == ["colour", "type"] and cat.left_out == {"fit": "no label on any row"}
    assert cat.vocab["type"] == ["dress", "shirt"] and len(cat) == 3


@pytest.mark.parametrize("check_files", [True, False])
def test_image_linked_out_of_the_catalog_is_refused(tmp_path, check_files):
    root = write_catalog(tmp_path / "cat", ["a.jpg,train,,red,dress", "out.jpg,train,,red,dress"], images=["a.jpg"])
    write_catalog(tmp_path / "elsewhere", [], images=["x.jpg"])
    (root / "out.jpg").symlink_to(tmp_path / "elsewhere" / "x.jpg")
    with pytest.raises(CatalogError, match=r"labels.csv, line 3: image path 'out.jpg' leaves the catalog"):
        read_catalog(root, check_files=check_files)
    (root / "out.jpg").unlink()
    (root / "shared").symlink_to(tmp_path / "elsewhere")  # a linked-in folder of photos
    (root / "labels.csv").write_text("image,split,title,colour,type\na.jpg,train,,red,dress\nshared/x.jpg,train,,red,dress\n")
    with pytest.raises(CatalogError, match=r"line 3: image path 'shared/x.jpg' leaves the catalog directory .* "
                                           r"through the symbolic link 'shared' -> '.*elsewhere'"):
        read_catalog(root, check_files=check_files)


def test_unreadable_images_in_catalog_order_on_several_threads(tmp_path):
    from retrieval.data.summary import unreadable_images

    names = [f"{i:02d}.jpg" for i in range(20)]
    root = write_catalog(tmp_path, [f"{n},train,,red,dress" for n in names])
    for bad in ("03.jpg", "11.jpg", "12.jpg"):
        (root / bad).write_bytes(b"not an image")
    (root / "17.jpg").unlink()  # missing: reading it fails like a corrupt file
    catalog = read_catalog(root, check_files=False)
    bad = unreadable_images(catalog, workers=3)
    assert [b.split(":")[0] for b in bad] == ["03.jpg", "11.jpg", "12.jpg", "17.jpg"]


def test_one_number_written_several_ways_is_pointed_out():
    from retrieval.data.summary import same_numbers

    assert same_numbers(["036", "36", "38", "38.0", "40", "L", "M", "nan", "NaN", "1e3", "1000"]) == \
        [["036", "36"], ["38", "38.0"], ["1e3", "1000"]]
    assert same_numbers(["S", "M", "36", "38"]) == []


def test_labels_joined_by_another_separator_are_pointed_out(tmp_path, capsys):
    # 'Black, White' and 'Red;Black' are labels the group has, joined; 'Black/White' (one two-tone
    # colour) and 'Blue, Navy' (Navy is no label of the group) are not pointed out
    from retrieval.data.summary import composite_labels

    labels = ["Black", "Black, White", "Black/White", "Blue, Navy", "Red", "Red;Black", "White"]
    assert composite_labels(labels) == ["Black, White", "Red;Black"]
    rows = [f'{i}.jpg,train,,"{label}",x' for i, label in enumerate(labels)]
    assert cli(["catalog-info", str(write_catalog(tmp_path, rows))]) == 0
    assert ("several labels in one cell? group 'colour' has 2 labels made of its other labels (e.g. 'Black, White'); "
            "separate the labels of a cell with '|' to make the group multi-label") in capsys.readouterr().out


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be"])
def test_a_unicode_text_export_in_utf16_reads_as_utf8(tmp_path, encoding):
    """A spreadsheet's "Unicode text" export: UTF-16 with its byte-order mark, cells separated by tabs."""
    root = write_catalog(tmp_path / "cat", ["a.jpg,train,Weiß,dress", "b.jpg,test,Grün,shirt"])
    text = "image\tsplit\tcolour\ttype\na.jpg\ttrain\tWeiß\tdress\nb.jpg\ttest\tGrün\tshirt\n"
    data = text.encode(encoding)
    (root / "labels.csv").write_bytes(data if data[:2] in (b"\xff\xfe", b"\xfe\xff") else b"\xfe\xff" + data)
    catalog = read_catalog(root)
    assert catalog.groups == ["colour", "type"] and catalog.vocab["colour"] == ["Grün", "Weiß"]
    assert [it.labels["colour"] for it in catalog.items] == [("Weiß",), ("Grün",)]

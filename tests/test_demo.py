"""Tests for retrieval.data.demo, the built-in demo catalog generator."""
import collections
import csv

import pytest
from PIL import Image

from retrieval.commands import demo as demo_command
from retrieval.data import demo

SIZE = 48
NO_SLEEVES = {"trousers", "skirt", "shorts", "bag", "hat"}


def read_rows(labels_path):
    with open(labels_path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """A 200-item demo catalog shared by the read-only tests of this module."""
    labels_path = demo.make_demo_catalog(tmp_path_factory.mktemp("demo"), n_items=200, seed=0,
                                         image_size=SIZE)
    return labels_path, read_rows(labels_path)


def test_header_and_groups(catalog):
    labels_path, rows = catalog
    assert demo.DEMO_GROUPS == ("category", "colours", "pattern", "sleeve", "gender")
    with open(labels_path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f))
    assert header == ["image", "split", "title", *demo.DEMO_GROUPS]
    assert labels_path.name == "labels.csv" and len(rows) == 200


def test_images_exist_open_and_have_requested_size(catalog):
    labels_path, rows = catalog
    assert [r["image"] for r in rows] == [f"images/{i:06d}.jpg" for i in range(len(rows))]
    for row in rows:
        with Image.open(labels_path.parent / row["image"]) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (SIZE, SIZE))


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    runs = {name: demo.make_demo_catalog(tmp_path / name, n_items=20, seed=seed, image_size=SIZE)
            for name, seed in (("a", 3), ("b", 3), ("c", 4))}
    a, b, c = (runs[k].parent for k in "abc")
    assert (a / "labels.csv").read_bytes() == (b / "labels.csv").read_bytes()
    for image in sorted((a / "images").iterdir()):
        assert image.read_bytes() == (b / "images" / image.name).read_bytes()
    assert (a / "labels.csv").read_bytes() != (c / "labels.csv").read_bytes()
    assert (a / "images/000000.jpg").read_bytes() != (c / "images/000000.jpg").read_bytes()


def test_rerun_in_same_dir_overwrites_and_leaves_no_temp_files(tmp_path):
    first = demo.make_demo_catalog(tmp_path, n_items=10, seed=1, image_size=SIZE).read_bytes()
    second = demo.make_demo_catalog(tmp_path, n_items=10, seed=1, image_size=SIZE).read_bytes()
    assert first == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "labels.csv"]


def test_colours_is_multi_label_from_the_palette(catalog):
    cells = [r["colours"].split("|") for r in catalog[1] if r["colours"]]
    multi = [c for c in cells if len(c) > 1]
    assert 0.15 < len(multi) / len(cells) < 0.45
    assert all(len(c) == len(set(c)) <= 2 for c in cells)
    assert {name for c in cells for name in c} <= set(demo.COLOURS)


def test_sleeve_is_empty_for_garments_without_sleeves(catalog):
    rows = catalog[1]
    assert all(r["sleeve"] == "" for r in rows if r["category"] in NO_SLEEVES)
    tops = [r for r in rows if r["category"] in {"tshirt", "shirt", "jacket", "dress"}]
    assert sum(bool(r["sleeve"]) for r in tops) > 0.85 * len(tops)
    assert {r["sleeve"] for r in tops} == {"short", "long", "sleeveless", ""}


def test_every_group_has_missing_labels_but_no_item_is_fully_blank(catalog):
    rows = catalog[1]
    for group in demo.DEMO_GROUPS:
        assert any(r[group] == "" for r in rows), group
    assert all(any(r[g] for g in demo.DEMO_GROUPS) for r in rows)
    missing_category = sum(r["category"] == "" for r in rows) / len(rows)
    assert 0.005 < missing_category < 0.15


def test_labels_are_imbalanced(catalog):
    rows = catalog[1]
    for group, ratio in (("category", 3), ("pattern", 3), ("colours", 1.5), ("gender", 1.5)):
        counts = collections.Counter(label for r in rows for label in r[group].split("|") if label)
        assert max(counts.values()) >= ratio * min(counts.values()), (group, counts)
    categories = collections.Counter(r["category"] for r in rows if r["category"])
    assert set(categories) == set(demo.CATEGORY_SHARES)
    assert categories.most_common(1)[0][0] == "tshirt"


def test_gender_follows_category(catalog):
    rows = [r for r in catalog[1] if r["category"] in {"dress", "skirt"} and r["gender"]]
    assert sum(r["gender"] == "women" for r in rows) > 0.75 * len(rows)


def test_split_is_train_or_test_about_80_20(catalog):
    splits = collections.Counter(r["split"] for r in catalog[1])
    assert set(splits) == {"train", "test"}
    assert splits["test"] == 40


def test_title_describes_the_garment(catalog):
    row = next(r for r in catalog[1] if r["category"] == "dress" and r["sleeve"] == "long")
    assert row["title"][0].isupper() and row["title"].endswith("long-sleeve dress")


def test_main_writes_catalog_and_prints_summary(tmp_path, capsys):
    out = tmp_path / "out"
    assert demo_command.main([str(out), "--n-items", "12", "--seed", "2", "--image-size", "32"]) == 0
    summary = capsys.readouterr().out.strip()
    assert str(out / "labels.csv") in summary and "12 items" in summary
    assert all(group in summary for group in demo.DEMO_GROUPS)
    assert len(read_rows(out / "labels.csv")) == 12


def test_invalid_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="n_items"):
        demo.make_demo_catalog(tmp_path, n_items=0)
    with pytest.raises(SystemExit) as exc:
        demo_command.main([str(tmp_path), "--image-size", "8"])
    assert exc.value.code == 2
    assert demo_command.get_args_parser().prog == "retrieval demo-catalog"


def test_demo_catalog_refuses_too_few_items_and_a_folder_holding_a_catalog(tmp_path, capsys):
    # --n-items 1 made a catalog nothing could train on; over a catalog of 120 a new one of 10 left 110
    # stale images beside it
    from retrieval.commands import demo as demo_command

    with pytest.raises(SystemExit):
        demo_command.main([str(tmp_path / "one"), "--n-items", "1"])
    assert "argument --n-items: 1 is under 10" in capsys.readouterr().err
    assert demo_command.main([str(tmp_path / "cat"), "--n-items", "12", "--image-size", "32"]) == 0
    with pytest.raises(SystemExit):
        demo_command.main([str(tmp_path / "cat"), "--n-items", "10", "--image-size", "32"])
    assert "already holds a catalog (labels.csv)" in capsys.readouterr().err

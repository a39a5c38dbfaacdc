"""Stand-in catalogues: the studio background mask, street, multi-label colour, missing- and noisy-label, many-group kinds."""
import numpy as np
import pytest
from PIL import Image

from retrieval.data.catalog import read_catalog
from retrieval.data.datasets import LABEL_DROPOUT_PROFILES
from retrieval.data.standins import NOISE, SIDE, WIDE_KEEP, colour_family, garment_mask, make_standin

COLOURS = {"Red": (200, 20, 20), "Blue": (20, 40, 200), "Green": (20, 160, 40), "Black": (10, 10, 10)}


def studio_photo(rgb) -> Image.Image:
    """A product shot: a coloured garment with a white inner patch, on white."""
    image = np.full((64, 48, 3), 255, np.uint8)
    image[12:56, 10:38] = rgb
    image[30:36, 20:28] = 255  # white inside the garment: not background
    return Image.fromarray(image)


@pytest.fixture(scope="module")
def studio_catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("studio")
    (root / "images").mkdir()
    rows = ["image,split,title,gender,baseColour,season"]
    for i in range(24):
        colour = list(COLOURS)[i % 4]
        studio_photo(COLOURS[colour]).save(root / f"images/{i}.png")
        rows.append(f"images/{i}.png,{'test' if i % 5 == 0 else 'train'},item {i},{'Men' if i % 2 else 'Women'},"
                    f"{colour},{'Summer' if i % 3 else 'Winter'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_garment_mask_removes_only_the_white_connected_to_the_border():
    alpha = garment_mask(np.asarray(studio_photo((200, 20, 20))))
    assert alpha[0, 0] == 0 and alpha[5, 40] == 0  # studio background
    assert alpha[20, 20] == pytest.approx(1) and alpha[33, 24] == pytest.approx(1)  # garment and its white patch


def test_street_standin_pastes_garments_on_clutter_deterministically(studio_catalog, tmp_path):
    make_standin(studio_catalog, tmp_path / "a", "street", n_items=10, seed=3)
    make_standin(studio_catalog, tmp_path / "b", "street", n_items=10, seed=3, workers=2)  # same, drawn in 2
    a, b, source = read_catalog(tmp_path / "a"), read_catalog(tmp_path / "b"), read_catalog(studio_catalog)
    assert a.groups == source.groups and len(a) == 10
    assert (tmp_path / "a/labels.csv").read_bytes() == (tmp_path / "b/labels.csv").read_bytes()
    assert all(a.path_of(i).read_bytes() == b.path_of(i).read_bytes() for i in a.items)
    by_title = {it.title: it for it in source.items}
    for item in a.items:  # every row keeps its source's labels and split
        assert item.labels == by_title[item.title].labels and item.split == by_title[item.title].split
        pixels = np.asarray(Image.open(a.path_of(item)).convert("RGB")).astype(int)
        assert pixels.shape == (SIDE, SIDE, 3)
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        assert (border.min(1) >= 235).mean() < 0.5  # no longer a white studio
    colour = COLOURS[a.items[0].labels["baseColour"][0]]
    garment = np.abs(np.asarray(Image.open(a.path_of(a.items[0])).convert("RGB")).astype(int) - colour).sum(2) < 90
    assert 0.01 < garment.mean() < 0.4  # the garment is there, scaled down (relit, so colour is near)
    make_standin(studio_catalog, tmp_path / "c", "street", n_items=10, seed=4)
    assert (tmp_path / "c/labels.csv").read_bytes() != (tmp_path / "a/labels.csv").read_bytes()


def test_more_items_than_the_source_has_are_capped_with_a_warning(studio_catalog, tmp_path, caplog):
    # the written catalog's size was the only sign
    make_standin(studio_catalog, tmp_path / "s", "street", n_items=30, seed=0)
    assert len(read_catalog(tmp_path / "s").items) == 24
    assert "--n-items 30: the source catalog has 24 images, each drawn once; the stand-in has 24" in caplog.text


def test_multicolour_standin_lists_the_colours_of_every_item_shown(studio_catalog, tmp_path):
    make_standin(studio_catalog, tmp_path / "m", "multicolour", n_items=24, seed=0)
    catalog, source = read_catalog(tmp_path / "m"), read_catalog(studio_catalog)
    assert catalog.multi_label_groups() == ["baseColour"]
    by_title = {it.title: it for it in source.items}
    counts = set()
    for item in catalog.items:
        main = by_title[item.title]
        colours = item.labels["baseColour"]
        counts.add(len(colours))
        assert colours[0] == main.labels["baseColour"][0] and len(set(colours)) == len(colours) <= 3
        assert {g: v for g, v in item.labels.items() if g != "baseColour"} == \
               {g: v for g, v in main.labels.items() if g != "baseColour"}
        pixels = np.asarray(Image.open(catalog.path_of(item)).convert("RGB")).astype(int)
        for name in colours:  # every listed colour is in the picture
            assert (np.abs(pixels - COLOURS[name]).sum(2) < 60).mean() > 0.005
    assert counts >= {1, 2}
    make_standin(studio_catalog, tmp_path / "m2", "multicolour", n_items=24, seed=0, workers=2)
    assert (tmp_path / "m2/labels.csv").read_bytes() == (tmp_path / "m/labels.csv").read_bytes()
    assert all((tmp_path / "m2" / it.image).read_bytes() == catalog.path_of(it).read_bytes() for it in catalog.items)


def test_multilabel_standin_has_the_multicolour_pictures_and_a_second_multi_label_group(studio_catalog, tmp_path):
    make_standin(studio_catalog, tmp_path / "m", "multicolour", n_items=24, seed=0)
    make_standin(studio_catalog, tmp_path / "l", "multilabel", n_items=24, seed=0)
    colour, labels = read_catalog(tmp_path / "m"), read_catalog(tmp_path / "l")
    # gender and season have two labels each: the first of the tie joins the colour group
    assert sorted(labels.multi_label_groups()) == ["baseColour", "gender"]
    for a, b in zip(colour.items, labels.items):
        assert colour.path_of(a).read_bytes() == labels.path_of(b).read_bytes()
        assert a.labels["baseColour"] == b.labels["baseColour"] and a.labels["season"] == b.labels["season"]
        assert b.labels["gender"][0] == a.labels["gender"][0] and len(set(b.labels["gender"])) == len(b.labels["gender"])
    assert {len(it.labels["gender"]) for it in labels.items} == {1, 2}


def test_street_standin_of_a_multilabel_standin_keeps_its_multi_label_groups(studio_catalog, tmp_path):
    # the street stand-in with multi-label colour and type, as the street catalogue has them
    make_standin(studio_catalog, tmp_path / "l", "multilabel", n_items=24, seed=0)
    make_standin(tmp_path / "l", tmp_path / "s", "street", n_items=12, seed=0)
    source, street = read_catalog(tmp_path / "l"), read_catalog(tmp_path / "s")
    assert sorted(street.multi_label_groups()) == ["baseColour", "gender"] and len(street) == 12
    by_title = {it.title: it for it in source.items}
    assert all(it.labels == by_title[it.title].labels for it in street.items)
    assert any(len(it.labels["baseColour"]) > 1 for it in street.items)
    for item in street.items:  # the multi-item pictures, pasted on clutter
        pixels = np.asarray(Image.open(street.path_of(item)).convert("RGB")).astype(int)
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        assert (border.min(1) >= 235).mean() < 0.5


def test_missing_standin_keeps_the_images_and_the_papers_shares(studio_catalog, tmp_path):
    make_standin(studio_catalog, tmp_path / "x", "missing", seed=0)
    catalog, source = read_catalog(tmp_path / "x"), read_catalog(studio_catalog)
    assert [it.image for it in catalog.items] == [it.image for it in source.items]
    assert [it.stat for it in catalog.items] == [it.stat for it in source.items]  # a source trunk cache serves it
    shares = LABEL_DROPOUT_PROFILES["paper"]
    for g, share in zip(catalog.groups, shares):
        kept = sum(bool(it.labels[g]) for it in catalog.items)
        assert kept == round(share * len(source))
        assert all(it.labels[g] in ((), src.labels[g]) for it, src in zip(catalog.items, source.items))
    with pytest.raises(ValueError, match="street, multicolour, multilabel, missing, noisy, wide"):
        make_standin(studio_catalog, tmp_path / "y", "indoor")
    with pytest.raises(ValueError, match="new folder"):
        make_standin(studio_catalog, studio_catalog, "street")


def test_noisy_standin_swaps_training_labels_only_at_its_rate(studio_catalog, tmp_path):
    make_standin(studio_catalog, tmp_path / "n", "noisy", seed=0)
    catalog, source = read_catalog(tmp_path / "n"), read_catalog(studio_catalog)
    assert [it.stat for it in catalog.items] == [it.stat for it in source.items]  # the images themselves
    pairs = list(zip(catalog.items, source.items))
    assert all(it.labels == src.labels for it, src in pairs if src.split == "test")
    train = [(it, src) for it, src in pairs if src.split == "train"]  # 19 of 24
    changed_somewhere = False
    for g in catalog.groups:
        kept = [it.labels[g] for it in source.items if it.split == "train"]
        # round(0.3 x 19) = 6 items drew a donor; a donor of the same class leaves the label as it was
        assert sum(it.labels[g] != src.labels[g] for it, src in train) <= round(NOISE * len(train))
        assert all(it.labels[g] in kept for it, _ in train)
        changed_somewhere |= any(it.labels[g] != src.labels[g] for it, src in train)
    assert changed_somewhere
    make_standin(studio_catalog, tmp_path / "n2", "noisy", seed=0)
    assert (tmp_path / "n2" / "labels.csv").read_text() == (tmp_path / "n" / "labels.csv").read_text()
    make_standin(studio_catalog, tmp_path / "n3", "noisy", seed=1)
    assert (tmp_path / "n3" / "labels.csv").read_text() != (tmp_path / "n" / "labels.csv").read_text()


def test_wide_standin_adds_four_groups_two_multi_label_each_kept_on_its_share(studio_catalog, tmp_path):
    make_standin(studio_catalog, tmp_path / "l", "multilabel", n_items=24, seed=0)
    make_standin(tmp_path / "l", tmp_path / "w", "wide", seed=0)
    source, wide = read_catalog(tmp_path / "l"), read_catalog(tmp_path / "w")
    assert wide.groups == [*source.groups, "colourFamily", "mainColour", "department", "occasion"]
    assert [it.stat for it in wide.items] == [it.stat for it in source.items]  # a source trunk cache serves it
    family = {"Red": "warm", "Blue": "cool", "Green": "cool", "Black": "dark"}
    for it, src in zip(wide.items, source.items):
        assert {g: it.labels[g] for g in source.groups} == src.labels
        colours = src.labels["baseColour"]
        assert it.labels["colourFamily"] == tuple(dict.fromkeys(family[c] for c in colours))
        assert it.labels["mainColour"] in ((), colours[:1])
        assert it.labels["department"] in ((), (f"{src.labels['gender'][0]} / {src.labels['season'][0]}",))
        assert it.labels["occasion"] in ((), tuple(dict.fromkeys(src.labels["gender"] + src.labels["season"])))
    assert sorted(wide.multi_label_groups()) == ["baseColour", "colourFamily", "gender", "occasion"]
    for g in ("mainColour", "department", "occasion"):  # dropped at random, at about the share asked
        kept = sum(bool(it.labels[g]) for it in wide.items)
        assert 0 < kept < len(wide) and abs(kept / len(wide) - WIDE_KEEP[g]) < 0.3
    again = tmp_path / "w2"
    make_standin(tmp_path / "l", again, "wide", seed=0)
    assert (again / "labels.csv").read_bytes() == (tmp_path / "w" / "labels.csv").read_bytes()
    make_standin(tmp_path / "w", tmp_path / "ww", "wide", seed=0)  # names already taken get a 2
    assert read_catalog(tmp_path / "ww").groups[-4:] == ["colourFamily2", "mainColour2", "department2", "occasion2"]


@pytest.mark.parametrize("name, family", [("Navy Blue", "cool"), ("Black", "dark"), ("Off White", "neutral"), ("Grey Melange", "neutral"),
                                          ("Maroon", "warm"), ("Pink", "warm"), ("Mustard", "other"),
                                          ("Sea Green", "cool"), ("Turquoise Blue", "cool"), ("Multi", "other"),
                                          ("Magenta", "warm"), ("Lavender", "cool"), ("Silver", "neutral")])
def test_colour_family_reads_the_name_as_a_css_colour(name, family):
    assert colour_family(name) == family


def test_snapshot_standin_turns_the_garment_on_a_plain_backdrop_deterministically(studio_catalog, tmp_path):
    make_standin(studio_catalog, tmp_path / "a", "snapshot", n_items=8, seed=3)
    make_standin(studio_catalog, tmp_path / "b", "snapshot", n_items=8, seed=3, workers=2)
    a, b, source = read_catalog(tmp_path / "a"), read_catalog(tmp_path / "b"), read_catalog(studio_catalog)
    assert a.groups == source.groups and len(a) == 8
    assert all(a.path_of(i).read_bytes() == b.path_of(i).read_bytes() for i in a.items)
    by_title = {it.title: it for it in source.items}
    for item in a.items:
        assert item.labels == by_title[item.title].labels and item.split == by_title[item.title].split
        pixels = np.asarray(Image.open(a.path_of(item)).convert("RGB")).astype(int)
        assert pixels.shape == (SIDE, SIDE, 3)
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        assert (border.min(1) >= 235).mean() < 0.5  # a backdrop, not the white studio
        assert border.std(0).max() < 40  # plain: one colour under uneven light, no clutter
        if item.labels["baseColour"] != ("Black",):  # a dim backdrop can be near black
            colour = COLOURS[item.labels["baseColour"][0]]
            garment = np.abs(pixels - colour).sum(2) < 150  # cast, dimmed and compressed: near its colour
            assert 0.03 < garment.mean() < 0.7

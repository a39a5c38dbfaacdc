"""Property-based tests of the catalog reader: whatever labels.csv holds, the reader returns a
catalog whose images stay inside its directory, or raises CatalogError naming the file (and the
line when one row is at fault). Never another exception."""
import csv
import io
import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from retrieval.data.catalog import CatalogError, read_catalog

# deterministic (CI must not fail on a new random draw), fast, and nothing written to the source tree
PROPERTY = settings(max_examples=300, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

PATHS = st.one_of(
    st.sampled_from(["a.jpg", "sub/b.jpg", "./a.jpg", "sub/../a.jpg", "../outside.jpg", "../../etc/passwd",
                     "/etc/passwd", "sub/../../outside.jpg", "link-out/x.jpg", "C:\\x.jpg", "~/a.jpg", ".", "..",
                     "", " ", "a\x00.jpg", "x" * 300 + ".jpg", "sub/" * 60 + "a.jpg", "missing.jpg", "sub"]),
    st.text(max_size=30),
)
CELLS = st.one_of(st.text(max_size=12), st.sampled_from(["", "red|blue", "|", " | ", "train", "test", '"', "a,b"]))
COLUMNS = st.lists(st.one_of(st.sampled_from(["image", "split", "title", "colour", "type", "", " "]),
                             st.text(max_size=6)), min_size=0, max_size=6)
ENCODINGS = st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "cp1252", "utf-16"])


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory) -> Path:
    """A catalog directory with two images, a file beside it and a symlink pointing out of it."""
    base = tmp_path_factory.mktemp("hostile")
    root = base / "cat"
    (root / "sub").mkdir(parents=True)
    for name in ("a.jpg", "sub/b.jpg"):
        Image.new("RGB", (4, 4)).save(root / name)
    Image.new("RGB", (4, 4)).save(base / "outside.jpg")
    os.symlink(base, root / "link-out")
    return root


def check_outcome(root: Path, check_files: bool = True):
    """Read the catalog; assert the property; return the catalog or the error."""
    csv_path = root / "labels.csv"
    try:
        catalog = read_catalog(root, check_files=check_files)
    except CatalogError as err:
        message = str(err)
        assert message.startswith(str(csv_path)), message
        line = re.match(re.escape(str(csv_path)) + r", line (\d+):", message)
        if line:
            assert 1 <= int(line.group(1)) <= csv_path.read_bytes().count(b"\n") + 1, message
        return err
    real_root = root.resolve()
    for item in catalog.items:
        assert (root / item.image).resolve().is_relative_to(real_root), item.image
        assert not check_files or (root / item.image).is_file(), item.image
    return catalog


def write_rows(root: Path, header: list[str], rows: list[list[str]], quoting: int, encoding: str) -> None:
    text = io.StringIO()
    writer = csv.writer(text, quoting=quoting)
    writer.writerow(header)
    writer.writerows(rows)
    (root / "labels.csv").write_bytes(text.getvalue().encode(encoding, errors="replace"))


@PROPERTY
@given(data=st.binary(max_size=400))
def test_random_bytes(catalog_dir, data):
    (catalog_dir / "labels.csv").write_bytes(data)
    check_outcome(catalog_dir)
    check_outcome(catalog_dir, check_files=False)


@PROPERTY
@given(header=COLUMNS, rows=st.lists(st.lists(CELLS, max_size=7), max_size=6),
       quoting=st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC]), encoding=ENCODINGS)
def test_random_tables(catalog_dir, header, rows, quoting, encoding):
    write_rows(catalog_dir, header, rows, quoting, encoding)
    check_outcome(catalog_dir)


@PROPERTY
@given(paths=st.lists(PATHS, min_size=1, max_size=4), split=st.sampled_from(["train", "test", "", "val"]))
def test_hostile_paths(catalog_dir, paths, split):
    write_rows(catalog_dir, ["image", "split", "colour"], [[p, split, "red"] for p in paths],
               csv.QUOTE_MINIMAL, "utf-8")
    outcome = check_outcome(catalog_dir)
    check_outcome(catalog_dir, check_files=False)
    if any(p.startswith("/") or "../.." in p or p.startswith("..") for p in paths):
        assert isinstance(outcome, CatalogError)


@PROPERTY
@given(lines=st.lists(st.text(alphabet="abcé€, ", max_size=10), min_size=1, max_size=8))
def test_a_windows_1252_file_reads_as_its_utf8_form(catalog_dir, lines):
    # one byte a letter (a spreadsheet's CSV export on Windows): the same catalog, or the same error
    text = "\n".join(["image,colour", *lines]) + "\n"
    try:  # 'é€€' is E9 80 80, UTF-8's 退 too: a file that is valid UTF-8 reads as UTF-8
        assume(text.encode("cp1252").decode("utf-8") == text)
    except UnicodeDecodeError:
        pass
    outcomes = []
    for encoding in ("utf-8", "cp1252"):
        (catalog_dir / "labels.csv").write_bytes(text.encode(encoding))
        outcome = check_outcome(catalog_dir, check_files=False)
        outcomes.append(str(outcome) if isinstance(outcome, CatalogError)
                        else [(it.image, it.split, it.labels) for it in outcome.items])
    if outcomes[0] != outcomes[1]:  # where its bytes hold more of UTF-8's letters than bytes it fails on
        as_utf8 = text.encode("cp1252").decode("utf-8", errors="replace")
        assert "is not UTF-8" in outcomes[1] and sum(c not in "\ufffd" and not c.isascii() for c in as_utf8) > \
            as_utf8.count("\ufffd")

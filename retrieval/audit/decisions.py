"""Review decisions on audit issues: appended to ``AUDIT_DIR/decisions.csv`` one whole line at a
time under a file lock (concurrent reviewers never lose or interleave a line), and applied to a
corrected *copy* of the catalog (labels.csv is never edited in place)."""
from __future__ import annotations

import csv
import fcntl
import io
import logging
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

from indexer.persist import remove_stale_temporaries, temporary_dir
from retrieval.atomic import atomic_write
from retrieval.data.catalog import (LABEL_SEPARATOR, LABELS_FILE, RESERVED_COLUMNS, csv_delimiter, decode_labels_file,
                                    header_names, image_path_of, link_or_copy, parse_labels, read_catalog)

logger = logging.getLogger(__name__)

FIELDS = ("timestamp", "image", "group", "kind", "given", "suggested", "decision")
DECISIONS = ("accept", "reject", "skip")


def append_decision(path: str | Path, image: str, group: str, kind: str, given: str, suggested: str,
                    decision: str) -> dict:
    """Append one timestamped decision; the header is written by whoever creates the file."""
    if decision not in DECISIONS:
        raise ValueError(f"Unknown decision {decision!r}; choose one of: {', '.join(DECISIONS)}")
    row = {"timestamp": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "image": image,
           "group": group, "kind": kind, "given": given, "suggested": suggested, "decision": decision}
    line = io.StringIO()
    csv.DictWriter(line, FIELDS, lineterminator="\n").writerow(row)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            header = ",".join(FIELDS) + "\n" if os.fstat(fd).st_size == 0 else ""
            os.write(fd, (header + line.getvalue()).encode())  # one write: a whole line or nothing
            os.fsync(fd)
        finally:
            os.close(fd)  # releases the lock
    except OSError as err:  # a folder there, no permission, a full disk: named (the errno is kept)
        raise OSError(err.errno, f"cannot record a decision in {path} ({err.strerror or err})") from None
    return row


def read_decisions(path: str | Path, strict: bool = True) -> list[dict]:
    """Decisions in the order they were made (a missing file holds none). A file that is not a
    decisions file (not UTF-8, a folder, its columns missing) is a ValueError naming it; so is a row
    without image, group or a known decision, unless not ``strict`` (the review page: such a
    hand-edited row is skipped with a warning rather than stopping the review)."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{path}: cannot read it as a decisions file ({err})") from None
    absent = [field for field in FIELDS if field not in (reader.fieldnames or [])]
    if rows and absent:
        raise ValueError(f"{path}: not a decisions file (no column {', '.join(absent)}; its header is "
                         f"{','.join(FIELDS)})")
    kept = []
    for n, row in enumerate(rows, start=2):
        if row.get("decision") not in DECISIONS or not row.get("image") or not row.get("group"):
            why = (f"{path}, line {n}: not a decision row (needs image, group and one of "
                   f"{', '.join(DECISIONS)})")
            if strict:
                raise ValueError(why)
            logger.warning("%s; skipped", why)
            continue
        kept.append(row)
    return kept


def labels_of(cell: str) -> set[str]:
    """A cell's labels as the catalog reader compares spellings: without letter case or extra spaces."""
    return {" ".join(label.casefold().split()) for label in parse_labels(cell or "")}


def latest(decisions: list[dict]) -> dict[tuple[str, str], dict]:
    """The last decision per (image, group): a later one overrides an earlier one."""
    return {(d["image"], d["group"]): d for d in decisions}


def apply_decisions(catalog_dir: str | Path, decisions: list[dict], out_dir: str | Path) -> int:
    """Write a corrected copy of the catalog to ``out_dir``, a new or empty folder (images hard-linked,
    or copied across file systems; a symbolic link's file, not the link): every accepted decision sets
    its group's cell to the suggested labels. The copy is made in a folder beside it and renamed into
    place once it reads as a catalog, so a failed run leaves nothing there. Returns the number of cells
    changed."""
    src, out = Path(catalog_dir), Path(out_dir)
    if out.resolve() == src.resolve():
        raise ValueError(f"{out}: the corrected catalog must go to a new folder, not over {src}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose another --out")
    read_catalog(src, check_files=False)  # a labels.csv that is no catalog (no image column: "error: image") named
    text = decode_labels_file(src / LABELS_FILE)  # and written as UTF-8 with commas
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=csv_delimiter(text.split("\n", 1)[0]))
    header = header_names(reader.fieldnames or [])
    rows = [dict(zip(header_names([k or "" for k in row]), row.values())) for row in reader]
    for row in rows:
        row["image"] = image_path_of(row["image"])  # as read_catalog names it (a Windows export's '\\' as '/')
    groups = [h for h in header if h and h not in RESERVED_COLUMNS]
    images = {row["image"] for row in rows}
    accepted: dict[str, list[dict]] = {}
    passed = {"an image no longer in the catalog": 0, "a group no longer in it (or not a group)": 0,
              "an empty suggestion": 0}
    for (image, group), d in latest(decisions).items():
        if d["decision"] != "accept":
            continue
        why = ("an image no longer in the catalog" if image not in images else
               "a group no longer in it (or not a group)" if group not in groups else
               "an empty suggestion" if not labels_of(d["suggested"]) else None)
        if why:
            passed[why] += 1
        else:
            accepted.setdefault(image, []).append(d)
    changed = stale = 0
    for row in rows:
        for d in accepted.get(row["image"], ()):
            if labels_of(row[d["group"]]) != labels_of(d.get("given", "")):  # relabelled since the audit
                stale += 1
                continue
            row[d["group"]] = LABEL_SEPARATOR.join(filter(None, d["suggested"].split(LABEL_SEPARATOR)))
            changed += 1
    told = [f"{n} for {why}" for why, n in passed.items() if n]
    if stale:
        told.append(f"{stale} whose cell changed since the audit (it showed another label: audit again)")
    if told:
        logger.warning("accepted decisions not applied: %s", "; ".join(told))
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)  # a killed apply's copy (its writer is gone), which nothing else removes
    work = temporary_dir(out)  # .OUT.tmp-HOST-PID-*: named by its writer (it was .OUT.partial-*, kept for ever)
    try:
        for row in rows:
            link_or_copy(src / row["image"], work / row["image"])
        with atomic_write(work / LABELS_FILE, newline="") as f:
            writer = csv.DictWriter(f, header, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        read_catalog(work)  # the copy must be a valid catalog
        mask = os.umask(0)
        os.umask(mask)
        work.chmod(0o777 & ~mask)  # a folder as mkdir makes it (mkdtemp's is 0o700)
        if out.exists():
            out.rmdir()  # empty (checked above)
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return changed


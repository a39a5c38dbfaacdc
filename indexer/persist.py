"""Reading and writing index directories: sidecar checks, view files, atomic directory swap, and
the removal of temporary directories that a killed writer left beside the index."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import urllib.parse
import uuid
from pathlib import Path

import faiss

from indexer.stale import HOST, pid_alive, writer_gone, writer_tag

logger = logging.getLogger(__name__)

MAX_VIEW_STEM = 200  # bytes of a view's file name before ".faiss" (file systems allow 255); longer ones end in a hash
SIDECAR = "sidecar.json"
FORMAT = 2  # 1: ids, paths, titles and labels in sidecar.json; 2: in items-*.npy, group views compact
SIDECAR_FIELDS = ("format", "fingerprint", "type", "dimension", "count", "metric", "created", "views",
                  "group_codec", "labels")


def temporary_dir(target: Path) -> Path:
    """A new private directory beside target, named ``.NAME.tmp-HOST-PID-RANDOM``."""
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{writer_tag()}-", dir=target.parent))


def copies_beside(target: Path) -> list[tuple[Path, re.Match]]:
    """The ``.NAME.tmp-*`` / ``.NAME.old-*`` / ``.NAME.del-*`` entries beside target, each with its name's
    parts: ``kind``, and the writer's ``host`` and ``pid`` (None in older versions' names)."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(?P<kind>tmp|old|del)-(?:(?P<host>[\w-]+)-(?P<pid>\d+)-)?\w+$")
    entries = os.scandir(target.parent) if target.parent.is_dir() else ()
    return [(Path(e.path), m) for e in entries for m in [pattern.match(e.name)] if m]


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Delete the ``.NAME.tmp-*`` / ``.NAME.old-*`` / ``.NAME.del-*`` directories beside target whose
    writer is gone, but for a swap stopped between its renames while no index is in place."""
    copies = copies_beside(target)
    # while no index is in place, the copies finish_interrupted_swap may need: an .old and its writer's .tmp
    olds = set() if target.exists() else {
        (m["host"], m["pid"]) for path, m in copies if m["kind"] == "old" and (path / SIDECAR).is_file()}
    removed = []
    for path, match in copies:
        try:
            stale = writer_gone(match["host"], match["pid"], path.stat(follow_symlinks=False).st_mtime)
            if stale and match["kind"] != "del" and (match["host"], match["pid"]) in olds:
                stale = False  # a swap stopped between its renames: finish_interrupted_swap's, never deleted
        except FileNotFoundError:  # its writer finished meanwhile
            continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            logger.info("Removed %s, left by a writer that is gone", path)
    return removed


SWAP_GONE_AFTER_S = 600  # a swap's second rename follows its first at once: one stopped this long ago is dead


def finish_interrupted_swap(target: Path) -> Path | None:
    """Put an index back where a swap killed between its two renames left none: the previous index
    is then ``.NAME.old-WRITER-*`` and the finished new one ``.NAME.tmp-WRITER-*`` (the swap starts
    only once it is written). The new one goes in place, or the previous one where the new one is
    gone; the next writer's clean-up deleted both before. Only a gone writer's; returns the directory
    moved into place, or None."""
    if target.exists() or target.is_symlink() or not target.parent.is_dir():
        return None
    found = {"tmp": {}, "old": {}}
    for path, match in copies_beside(target):
        try:
            if match["kind"] not in found or match["pid"] is None or not (path / SIDECAR).is_file():
                continue  # an index of a named writer: never a half-written copy
            # the writer is gone: a dead process of this host, or a swap stopped long ago (since its rename,
            # the inode's change time: a rename keeps an old index's modification time, and a live writer's
            # .old of a day-old index looked gone by it); another host's, or a pid used again since
            moved = time.time() - path.stat(follow_symlinks=False).st_ctime
            if (match["host"] == HOST and not pid_alive(int(match["pid"]))) or moved > SWAP_GONE_AFTER_S:
                found[match["kind"]].setdefault((match["host"], match["pid"]), []).append(path)
        except OSError:  # moved meanwhile (its writer finished, or another reader repairs)
            continue
    if not found["old"]:
        return None  # a killed build of a first index: nothing was in place to lose
    try:
        writer, olds = max(found["old"].items(), key=lambda kv: max(p.stat().st_ctime for p in kv[1]))
        finished = found["tmp"].get(writer, [])
        chosen = finished[0] if finished else max(olds, key=lambda p: p.stat().st_ctime)
        os.replace(chosen, target)
    except OSError:  # another reader put one in place meanwhile (target exists now, or chosen is gone)
        return None
    logger.warning("%s was missing (a swap stopped between its renames): put %s in its place (%s)", target,
                   chosen.name, "the new index" if finished else "the previous index, the new one being gone")
    return target


def check_replaceable(target: Path) -> None:
    """Refuse an index target that is something else: a file, or a folder holding files but no
    sidecar.json (a catalog, a run: replacing the index deletes what was there). A missing or empty
    folder, or an index, may be (re)written."""
    target = Path(target)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise FileExistsError(f"{target} is a file, not an index directory; choose another --out")
    if target.is_dir() and not (target / SIDECAR).is_file() and any(target.iterdir()):
        raise FileExistsError(f"{target} holds files but no index ({SIDECAR}); writing the index there would "
                              "delete them: choose a new or empty folder")


def swap_into_place(new: Path, target: Path) -> None:
    """Rename the finished directory new to target, moving an existing target away first (an index:
    ``IndexStore.save`` calls ``check_replaceable`` before it writes anything)."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{writer_tag()}-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    try:
        os.replace(new, target)
    except OSError:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:  # renamed first: a kill during a long rmtree leaves a .del, never an .old to restore
        gone = old.with_name(old.name.replace(".old-", ".del-", 1))
        os.replace(old, gone)
        shutil.rmtree(gone, ignore_errors=True)


def fsync_file(path: Path) -> None:
    """Flush one file's contents to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def read_sidecar(directory: Path, ignore_retired: bool = False) -> dict:
    """Return the parsed sidecar of an index directory, with clear errors when missing or corrupt
    (``ignore_retired``: without its ``retired`` record, read or not)."""
    path = directory / SIDECAR
    if not path.is_file():
        raise FileNotFoundError(f"Index sidecar not found: {path} (is {directory} an index directory?)")
    try:
        sidecar = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"Corrupt index sidecar {path}: {err}") from err
    if isinstance(sidecar, dict) and sidecar.get("format", 1) != FORMAT and "ids" in sidecar:
        raise IndexMismatch(f"{path} is an index of format {sidecar.get('format', 1)}, this version reads "
                            f"format {FORMAT}; rebuild it (retrieval index build, or scripts/rebuild_index.sh)",
                            "format")
    if ignore_retired and isinstance(sidecar, dict):
        sidecar.pop("retired", None)
    missing = [f for f in SIDECAR_FIELDS if not isinstance(sidecar, dict) or f not in sidecar]
    if missing:
        raise ValueError(f"Corrupt index sidecar {path}: missing field(s) {', '.join(missing)}")
    wrong = sidecar_type_errors(sidecar)
    if wrong:
        raise ValueError(f"Corrupt index sidecar {path}: {'; '.join(wrong)}")
    return sidecar


def is_count(value) -> bool:
    """Whether a JSON value is a whole number (``true`` and ``"288"`` are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def json_kind(value) -> str:
    """How a JSON value reads in a message: ``a list``, ``an object without 'shared'``, ``the string '288'``."""
    if isinstance(value, dict):
        return "an object without 'shared'"
    if isinstance(value, list):
        return "a list"
    return f"{value!r}"[:60]


def sidecar_type_errors(sidecar: dict) -> list[str]:
    """What is of the wrong type in a sidecar that has every field (hand-edited, or written by something
    else): a dimension as a string, ``views`` or ``labels`` as a list. Each names the field."""
    wrong = []
    for name in ("dimension", "count"):
        if not is_count(sidecar[name]) or sidecar[name] < 0:
            wrong.append(f"{name} is {sidecar[name]!r}, not a whole number")
    for name in ("fingerprint", "type", "created"):
        if not isinstance(sidecar[name], str):
            wrong.append(f"{name} is {sidecar[name]!r}, not a string")
    views = sidecar["views"]
    if not isinstance(views, dict) or "shared" not in views:
        wrong.append(f"views is {json_kind(views)}, not an object {{view: dimension}} with a 'shared' view")
    else:
        wrong += [f"views[{view!r}] is {dim!r}, not a dimension (a whole number above 0)"
                  for view, dim in views.items() if not is_count(dim) or dim < 1]
    if "next_id" in sidecar and not is_count(sidecar["next_id"]):
        wrong.append(f"next_id is {sidecar['next_id']!r}, not a whole number")
    files = sidecar.get("files")
    if files is not None:
        if not isinstance(files, dict):
            wrong.append(f"files is {json_kind(files)}, not an object {{view: file name}}")
        else:
            wrong += [f"files[{view!r}] is {name!r}, not a file name in the index directory"
                      for view, name in files.items()
                      if not isinstance(name, str) or not name or Path(name).name != name or name in (".", "..")]
    labels = sidecar["labels"]
    if not isinstance(labels, dict):
        wrong.append(f"labels is {json_kind(labels)}, not an object {{group: [labels]}}")
    else:
        wrong += [f"labels[{group!r}] is not a list of label strings" for group, vocab in labels.items()
                  if not isinstance(vocab, list) or not all(isinstance(label, str) for label in vocab)]
    if sidecar.get("shared_view") is not None and not isinstance(sidecar["shared_view"], str):
        wrong.append(f"shared_view is {sidecar['shared_view']!r}, not a string")
    power = sidecar.get("multi_label_view_power")
    if power is not None and (isinstance(power, bool) or not isinstance(power, (int, float))):
        wrong.append(f"multi_label_view_power is {power!r}, not a number")
    if "retired" in sidecar:
        wrong += retired_errors(sidecar["retired"])
    return wrong


def retired_errors(retired) -> list[str]:
    """What is wrong with a sidecar's ``retired`` record (``{"paths": [image path], "ids": [id]}``, aligned:
    the id each image the index held and holds no more had), each naming the field. A server reads it with
    every index: the checks are set and type passes over the lists, the offending entry sought only then."""
    paths, ids = (retired.get(name) if isinstance(retired, dict) else None for name in ("paths", "ids"))
    if not isinstance(paths, list) or not isinstance(ids, list):
        what = "an object without the lists 'paths' and 'ids'" if isinstance(retired, dict) else json_kind(retired)
        return [f'retired is {what}, not an object {{"paths": [image paths], "ids": [ids]}}']
    wrong = []
    if not set(map(type, paths)) <= {str}:
        at = next(k for k, path in enumerate(paths) if not isinstance(path, str))
        wrong.append(f"retired.paths[{at}] is {json_kind(paths[at])}, not an image path (a string)")
    elif len(set(paths)) != len(paths):
        wrong.append(f"retired.paths lists {twice(paths)!r} twice")
    if not set(map(type, ids)) <= {int} or not 0 <= min(ids, default=0) <= max(ids, default=0) < 2**63:
        at = next(k for k, i in enumerate(ids) if not is_count(i) or not 0 <= i < 2**63)
        wrong.append(f"retired.ids[{at}] is {json_kind(ids[at])}, not an id (a whole number, 0 or more)")
    elif len(set(ids)) != len(ids):
        wrong.append(f"retired.ids lists {twice(ids)} twice (an id names one image)")
    if len(paths) != len(ids):
        wrong.append(f"retired.paths has {len(paths)} entries, retired.ids {len(ids)}")
    return wrong


def twice(values: list):
    """The first value of a list that an earlier entry has too."""
    seen = set()
    for value in values:
        if value in seen:
            return value
        seen.add(value)


def retired_items(sidecar: dict) -> dict[str, int]:
    """{image path: id} of a checked sidecar's ``retired`` record (an index saved before it: none)."""
    retired = sidecar.get("retired")
    return dict(zip(retired["paths"], retired["ids"])) if retired else {}


class IndexMismatch(ValueError):
    """An index built for other embeddings or by another version (``field``: fingerprint, dimension, format)."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


def check_expected(sidecar: dict, field: str, expected, path: Path) -> None:
    """Raise IndexMismatch naming field and both values when expected is given and differs."""
    if expected is not None and sidecar[field] != expected:
        raise IndexMismatch(f"Index {field} mismatch: {path} has {field}={sidecar[field]!r}, "
                         f"expected {field}={expected!r}; rebuild the index for these embeddings", field)


def view_file(directory: Path, view: str) -> Path:
    """A view's file, ``<view>.faiss`` in directory: a character other than an ASCII letter, digit or
    ``_.-~`` is written %XX (its UTF-8 bytes), so that a group of any name (``Sleeve Length``,
    ``Farbe/Colour``) is one portable file name and the names allowed before keep their files; a name
    longer than MAX_VIEW_STEM bytes so written is cut there and ends in a hash of the whole."""
    stem = urllib.parse.quote(view, safe="")
    if len(stem) > MAX_VIEW_STEM:
        cut = stem[:MAX_VIEW_STEM - 17]
        if "%" in cut[-2:]:  # not in the middle of an escape
            cut = cut[:cut.rindex("%")]
        stem = f"{cut}-{name_hash(view)}"
    return Path(directory) / f"{stem}.faiss"


def name_hash(view: str) -> str:
    """The 16 hex digits of a view's SHA-1 that end a file name cut short or told apart."""
    return hashlib.sha1(view.encode()).hexdigest()[:16]


def view_files(views) -> dict[str, str]:
    """Each view's file name (``view_file``), distinct without letter case too: on a case-insensitive
    file system (macOS, Windows) ``group-Colour`` and ``group-colour`` would write one file, so the
    later of two such names ends in a hash of its view. The sidecar keeps the names (``files``)."""
    files, taken = {}, set()
    for view in views:
        name = view_file(Path("."), view).name
        if name.lower() in taken:
            name = f"{name[:-len('.faiss')]}-{name_hash(view)}.faiss"
        taken.add(name.lower())
        files[view] = name
    return files


def read_view(path: Path, dimension: int, mmap: bool = False) -> faiss.Index:
    """Read one <view>.faiss file, checking it exists, parses and has the sidecar's dimension; with
    mmap, flat and scalar-quantized codes stay in the file's pages (read-only: for servers)."""
    if not path.is_file():
        raise FileNotFoundError(f"Index view file not found: {path}")
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC if mmap else 0)
    except RuntimeError as err:
        raise ValueError(f"Corrupt index file {path}: {err}") from err
    if index.d != dimension:
        raise ValueError(f"Index file {path} has dimension {index.d}, its sidecar says {dimension}")
    return index

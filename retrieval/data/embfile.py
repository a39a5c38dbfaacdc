"""EMB.h5, the embeddings file (docs/formats.md): its one reader, the resumable work file its writer
fills (merged into the final file by ``embed.shards``), and the scoring rules of what it holds. The evaluator, the index command and the web app read it only through here; ``indexer/``
takes the arrays. h5py and numpy only."""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from retrieval.atomic import in_use
from retrieval.data.cooccurrence import apply_prior
from retrieval.data.catalog import digest_change

logger = logging.getLogger(__name__)

SIGMOID_GROUPS = "sigmoid_groups"  # attribute: groups whose head scores are independent sigmoids
SHARED_VIEW_READS = ("file", "embedding")  # read a file's shared view as stored, or its embedding alone
SHARED_VIEW_WEIGHTS = "shared_view_weights"  # attribute: the matches view's group weights (``group_spread_weights``)
HEAD_LABELS = "head_labels"  # attribute: each group's labels in the order of its heads' columns (``probs/``)
# attribute: the strength of each group view's prior (``cooccurrence.py``) the file's group views were mixed with
GROUP_VIEW_PRIOR = "group_view_prior"
JSON_ATTRS = ("groups", "skipped", SIGMOID_GROUPS, SHARED_VIEW_WEIGHTS, HEAD_LABELS, GROUP_VIEW_PRIOR)
CHUNK_ROWS = 65536  # rows read at a time by ``select_rows``
# the shared embedding's weight in the ``matches`` shared view (``shared_vectors``): its cosine counts
# a quarter beside the groups' mean chance of a match. Measured post hoc on thirteen catalogues (mAP@50
# paper): the shared view's mean within 0.1 at 0.5 and 0.7 on twelve, never better at 0.35, lower at 1.0
# on the clean ones with a multi-label group; colour 0.3-1.0 higher at 0.5 than at 0.7 (README, issue 16)
MATCHES_EMBEDDING_WEIGHT = 0.5
# a multi-label group's group view ranks by p·q / (|p| |q|)^power (``group_vectors``): 1 = the cosine
# (the rule before), 0 = the expected number of shared labels. Measured post hoc on the default's
# files of six catalogues with label attention (README, issue 16): 0.5 is the best or within 0.1 of it on each,
# the group view's mean +0.5 to +1.6 over the cosine (colour's own +3.7 to +6.0)
MULTI_LABEL_VIEW_POWER = 0.5
# attribute: the power a file's multi-label group views were written with (files without it: 1, the cosine)
MULTI_LABEL_VIEW_ATTR = "multi_label_view_power"
STATS = "stats"  # dataset int64 [N, 2]: each row's image file (size, mtime_ns) when embedded (embed.reuse)
# the ``matches`` shared view weighs each group by 1 / the spread of its p·q over pairs of items
# (``group_spread_weights``), so that every group moves the ranking alike. Items used (the first ones):
# all pairs of 2,000 items are 2M scores, a 32 MB matrix per group
SPREAD_ITEMS = 2000
MIN_SPREAD = 1e-4  # a group whose p·q barely varies (one label, or a head that says the same for all) keeps weight 1
# no group weighs more than this many times the median group, nor less than its inverse: a group nearly
# constant among the validation items (one class for almost all, or a handful of items) would otherwise
# take most of the weight and leave the others little beside the embedding. Unreached on the 29
# catalogues measured (the largest: 2.0 x the median, the street stand-in's article type)
MAX_WEIGHT_RATIO = 3.0


# a group's name as an HDF5 link name (``h5_key``): '/' separates the parts of an HDF5 path and '.'
# alone names the parent, so these are written as %-escapes ('%' too, so that each key reads back one way)
H5_ESCAPES = {"%": "%25", "/": "%2F"}
H5_UNESCAPES = {"%25": "%", "%2F": "/", "%2E": "."}
H5_ESCAPE = re.compile("|".join(H5_UNESCAPES))


def h5_key(group: str) -> str:
    """The link name of a group's datasets under ``groups/`` and ``probs/``: '%' and '/' written as
    %25 and %2F, a name '.' as %2E; any other name (every name of the files written before) is itself."""
    key = "".join(H5_ESCAPES.get(c, c) for c in group)
    return "%2E" if key == "." else key


def group_name(key: str) -> str:
    """The group a ``groups/`` or ``probs/`` link name holds (``h5_key`` undone)."""
    return H5_ESCAPE.sub(lambda m: H5_UNESCAPES[m.group()], key)


class EmbeddingsError(ValueError):
    """An embeddings file that cannot be used; the message names the file and the dataset."""


@dataclass
class Embeddings:
    """The contents of an EMB.h5 file (head probabilities are read apart: ``read_probabilities``)."""

    vectors: np.ndarray
    ids: np.ndarray
    paths: list[str]
    group_vectors: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return str(self.attrs.get("fingerprint", ""))

    @property
    def sigmoid_groups(self) -> list[str] | None:
        """Groups scored by sigmoids, as the model that wrote the file says (None: an older file)."""
        return self.attrs.get(SIGMOID_GROUPS)

    def as_dict(self) -> dict:
        """The arrays as ``indexer.build_store_from_embeddings`` takes them."""
        return {"vectors": self.vectors, "ids": self.ids, "paths": self.paths, "groups": self.group_vectors,
                "attrs": self.attrs}


def decode_attr(name: str, value):
    """An HDF5 attribute as plain Python: str for bytes, lists for the JSON-list attributes."""
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, np.generic):
        value = value.item()
    if name in JSON_ATTRS and isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def open_file(path: str | Path) -> h5py.File:
    path = Path(path)
    if not path.is_file():
        raise EmbeddingsError(f"{path}: embeddings file not found")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise EmbeddingsError(f"{path}: cannot read the embeddings file as HDF5 ({err})") from err


def check_layout(f: h5py.File, path: str | Path) -> int:
    """The row count of an open embeddings file, after checking that vectors, ids, paths and every
    group view exist, that the vectors and group views are 2-D, and that all have as many rows."""
    names = ["vectors", "ids", "paths"] + [f"groups/{g}" for g in f.get("groups", {})]
    missing = [name for name in names if name not in f]
    if missing:
        raise EmbeddingsError(f"{path} lacks dataset(s) {', '.join(missing)}; it has: {', '.join(f.keys()) or 'nothing'}")
    for name in ["vectors"] + names[3:]:
        if f[name].ndim != 2:
            raise EmbeddingsError(f"{path}: dataset {name!r} must be 2-D, has shape {f[name].shape}")
    n = f["vectors"].shape[0]
    for name in names[1:]:
        if f[name].shape[0] != n:
            raise EmbeddingsError(f"{path}: dataset {name!r} has {f[name].shape[0]} rows, 'vectors' has {n}")
    return n


def read_embeddings(path: str | Path) -> Embeddings:
    """Vectors, ids, paths, group vectors and attributes, with every dataset's row count checked."""
    with open_file(path) as f:
        check_layout(f, path)
        emb = Embeddings(np.asarray(f["vectors"][...], dtype=np.float32),
                         np.asarray(f["ids"][...], dtype=np.int64).reshape(-1),
                         [str(p) for p in f["paths"].asstr()[...]],
                         {group_name(k): np.asarray(ds[...], dtype=np.float32)
                          for k, ds in f.get("groups", {}).items()},
                         {name: decode_attr(name, value) for name, value in f.attrs.items()})
    logger.info("Read %d embeddings of dimension %d from %s", *emb.vectors.shape, path)
    return emb


def read_probabilities(path: str | Path, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Head probabilities ``probs/<group>`` of the given rows ({} when the file has none)."""
    with open_file(path) as f:
        if "probs" not in f:
            return {}
        return {group_name(k): select_rows(ds, np.asarray(rows, dtype=np.int64)) for k, ds in f["probs"].items()}


def read_paths(path: str | Path) -> list[str]:
    """The image paths of an embeddings file, in row order (no vectors read)."""
    with open_file(path) as f:
        if "paths" not in f:
            raise EmbeddingsError(f"{path} lacks dataset(s) paths; it has: {', '.join(f.keys()) or 'nothing'}")
        return [str(p) for p in f["paths"].asstr()[...]]


def read_attrs(path: str | Path) -> dict:
    """The attributes of an embeddings file as plain Python (``decode_attr``)."""
    with open_file(path) as f:
        return {name: decode_attr(name, value) for name, value in f.attrs.items()}


def read_rows(path: str | Path, rows: np.ndarray) -> Embeddings:
    """``read_embeddings`` restricted to the given rows (in their order): memory is theirs plus
    one ``CHUNK_ROWS`` slice of a dataset, whatever the file's size."""
    rows = np.asarray(rows, dtype=np.int64)
    with open_file(path) as f:
        n = check_layout(f, path)
        if len(rows) and (rows.min() < 0 or rows.max() >= n):
            raise EmbeddingsError(f"{path}: rows outside 0..{n - 1} asked for")
        emb = Embeddings(select_rows(f["vectors"], rows).astype(np.float32, copy=False),
                         select_rows(f["ids"], rows).astype(np.int64).reshape(-1),
                         [str(p) for p in select_rows(f["paths"].asstr(), rows)],
                         {group_name(k): select_rows(ds, rows).astype(np.float32, copy=False)
                          for k, ds in f.get("groups", {}).items()},
                         {name: decode_attr(name, value) for name, value in f.attrs.items()})
    logger.info("Read %d of %d embeddings from %s", len(rows), n, path)
    return emb


def select_rows(dataset, rows: np.ndarray) -> np.ndarray:
    """``dataset[rows]`` for rows in any order, read one ``CHUNK_ROWS`` slice at a time (only the
    slices holding a wanted row): h5py's own fancy indexing is slow on many rows."""
    order = np.argsort(rows, kind="stable")
    wanted = rows[order]
    out = np.empty((len(rows), *dataset.shape[1:]), dtype=dataset.dtype)
    for start in range(0, dataset.shape[0], CHUNK_ROWS):
        low, high = np.searchsorted(wanted, [start, start + CHUNK_ROWS])
        if low < high:
            out[order[low:high]] = dataset[start:start + CHUNK_ROWS][wanted[low:high] - start]
    return out


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (all-zero rows stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def group_vectors(probs: dict[str, np.ndarray], sigmoid_groups,
                  power: float = MULTI_LABEL_VIEW_POWER, prior: dict | None = None) -> dict[str, np.ndarray]:
    """Group-focused vectors from head probabilities, ranked by inner product: the rule for the
    model's own outputs and for fused scores alike.

    Softmax groups keep their probabilities (p·q is the model's probability that two items share
    the label), mixed, for the groups of the model's ``prior`` (``cooccurrence.apply_prior``; the
    other groups' probabilities are needed then), with what the other heads say of them. Sigmoid
    groups are divided by their length to the ``power`` (``MULTI_LABEL_VIEW_POWER``), so two items score p·q / (|p| |q|)^power: at 1 (the rule before, and ``with-groups``'s) the cosine,
    which ranks the candidate with exactly the query's set of labels first; at 0 the expected number
    of labels they share, which favours items with many likely labels (before the head fit made the
    sigmoids decisive, the demo catalog's colours: 38.2 against the cosine's 67.5 mAP@50)."""
    out = {}
    for g, p in apply_prior(probs, prior).items():
        v = np.asarray(p, dtype=np.float32)
        if g in sigmoid_groups:
            v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12) ** np.float32(power)
        out[g] = v
    return out


def group_spread_weights(probs: dict[str, np.ndarray], limit: int = SPREAD_ITEMS) -> dict[str, float]:
    """The ``matches`` shared view's weight of each group: 1 / the standard deviation of p·q over the
    pairs of the first ``limit`` items (two different items each), scaled to mean 1 over the groups
    that vary, so that each group's score moves the ranking as much as any other's. Under equal weights
    a group whose p·q varies little (many labels, rarely agreed on with certainty: a colour, an
    article type) barely orders the candidates beside ones that are near 0 or 1 for every pair (gender,
    master category). A group that varies less than ``MIN_SPREAD`` keeps 1 (it cannot reorder); the
    others are held within ``MAX_WEIGHT_RATIO`` of their median before the scaling. Empty
    with fewer than 3 items (too few pairs to tell). Measured on the default's files of 29 catalogues
    and seeds (README, issue 16): colour in the shared view +0.2 to +1.5 mAP@50 on every one, the mean
    -0.4 to +0.1."""
    if not probs or len(next(iter(probs.values()))[:limit]) < 3:  # every group has the same rows
        return {}
    spread = {}
    for g, p in probs.items():
        p = np.asarray(p[:limit], dtype=np.float64)
        scores = p @ p.T
        spread[g] = float(scores[~np.eye(len(p), dtype=bool)].std())
    varying = {g: 1.0 / s for g, s in spread.items() if s >= MIN_SPREAD}
    if not varying:
        return {}
    median = float(np.median(list(varying.values())))
    varying = {g: min(max(w, median / MAX_WEIGHT_RATIO), median * MAX_WEIGHT_RATIO) for g, w in varying.items()}
    mean = float(np.mean(list(varying.values())))
    return {g: round(varying[g] / mean, 6) if g in varying else 1.0 for g in spread}


def shared_vectors(embedding: np.ndarray, probs: dict[str, np.ndarray], sigmoid_groups=(),
                   how: str = "with-groups", weights: dict[str, float] | None = None) -> np.ndarray:
    """What the shared view ranks by (``ModelConfig.shared_view``), from the shared embedding and
    the heads' probabilities (in the model's group order):

    - ``embedding``: the shared embedding alone;
    - ``with-groups``: the embedding followed by every group's view (``group_vectors`` with the
      sigmoid groups at unit length, as this view was measured) scaled by 1/sqrt(G), the whole
      L2-normalised: the inner product of two items is (e·e' + mean_g v_g·v'_g) / (their norms), the
      embedding's cosine plus the chance, averaged over the groups, that the two share each group's
      label, every group counting alike;
    - ``matches``: the embedding (unit length) times ``MATCHES_EMBEDDING_WEIGHT`` followed by every
      group's probabilities as they are, sigmoid groups too, scaled by 1/sqrt(G), and not
      normalised: the inner product is e·e'/4 + mean_g p_g·p'_g, where p·p' is the chance that the
      two share a single-label group's label, and for a multi-label group the expected number of
      labels they share. The expected share of the groups two items match, ranked as such: no
      normalisation divides a confident item's score down, and an item showing several colours
      keeps each (a cosine ranks the item with exactly the query's set of labels first, the
      evaluation and a shopper count any shared one). Measured against ``with-groups`` on thirteen
      catalogues (README, issue 16): colour in the shared view +0.5 to +5.0 mAP@50 on every one,
      the mean -0.2 to +0.9. ``weights`` (``group_spread_weights``; a group absent counts 1) multiply
      each group's p·p' (its block by their square root): the model's, from its checkpoint.

    Both joined forms are padded with zero columns to a multiple of 8 (no inner product changes;
    FAISS's PQ codes need a width with many divisors: ``indexer.index.default_pq_m``)."""
    if how == "embedding" or not probs:
        return embedding
    if how == "with-groups":
        parts = [np.asarray(embedding, dtype=np.float32)]
        views = group_vectors(probs, sigmoid_groups, power=1.0)  # unit length, as this view always had
    elif how == "matches":
        parts = [MATCHES_EMBEDDING_WEIGHT * unit_rows(np.asarray(embedding, dtype=np.float32))]
        weights = weights or {}
        views = {g: np.asarray(p, dtype=np.float32) * np.float32(np.sqrt(weights.get(g, 1.0)))
                 for g, p in probs.items()}
    else:
        raise EmbeddingsError(f"Unknown shared view {how!r}; choose one of: embedding, with-groups, matches")
    parts += [v / np.sqrt(len(views)) for v in views.values()]
    width = sum(p.shape[1] for p in parts)
    parts.append(np.zeros((len(parts[0]), -width % 8), dtype=np.float32))
    joined = np.concatenate(parts, axis=1)
    return unit_rows(joined) if how == "with-groups" else joined


def multi_label_view_power(attrs: dict) -> float | None:
    """The power a file's (or an index's) multi-label group views were written with (``group_vectors``):
    the recorded one, 1.0 (the cosine) where a file with sigmoid groups predates the attribute, None
    where it has no sigmoid group (nothing to scale)."""
    sigmoid = attrs.get(SIGMOID_GROUPS)
    if MULTI_LABEL_VIEW_ATTR in attrs:
        return float(attrs[MULTI_LABEL_VIEW_ATTR])
    return 1.0 if sigmoid else None


def index_view_power(recorded: float | None) -> float:
    """The power an index's multi-label group views hold: the one its sidecar records, else 1.0 (the
    cosine: an index built before the record; one without multi-label groups scales nothing either way)."""
    return 1.0 if recorded is None else float(recorded)


def ranks_by_cosine(shared_view: str) -> bool:
    """Whether a shared view's vectors are unit length (inner product = cosine; ``shared_vectors``):
    every view but ``matches``, whose lengths carry how sure the heads are."""
    return shared_view != "matches"


def shared_view_rows(rows: np.ndarray, attrs: dict, how: str = "file") -> np.ndarray:
    """Rows of a file's ``vectors`` as the shared view ``how`` (``SHARED_VIEW_READS``): ``file``, as
    stored; ``embedding``, the shared embedding alone: the first ``embedding_dim`` columns of a
    with-groups or matches file (``shared_vectors``), L2-normalised again, or the rows as they are when the file
    holds the embedding alone (or is older than the option). ``attrs``: the file's attributes."""
    if how not in SHARED_VIEW_READS:
        raise EmbeddingsError(f"Unknown shared view {how!r}; choose one of: {', '.join(SHARED_VIEW_READS)}")
    if how == "file" or attrs.get("shared_view", "embedding") == "embedding":
        return rows
    width = int(attrs.get("embedding_dim", 0))
    if not 0 < width <= rows.shape[1]:
        raise EmbeddingsError(f"embeddings file has shared view {attrs['shared_view']!r} without a valid "
                              f"embedding_dim attribute ({width}); embed it again")
    return unit_rows(rows[:, :width])


def shared_view_name(attrs: dict, how: str = "file") -> str:
    """What ``shared_view_rows(.., attrs, how)`` gives, by ``ModelConfig.shared_view``'s names."""
    return "embedding" if how == "embedding" else str(attrs.get("shared_view", "embedding"))


def embedding_part(emb: Embeddings) -> np.ndarray:
    """The shared embedding alone from a file's shared-view vectors (``shared_view_rows``)."""
    return shared_view_rows(emb.vectors, emb.attrs, "embedding")


def fuse_probabilities(a: dict[str, np.ndarray], b: dict[str, np.ndarray], what: str = "the two models",
                       labels_a: dict | None = None, labels_b: dict | None = None) -> dict:
    """Score fusion: the mean of two models' class scores, group by group. ``labels_a`` / ``labels_b``:
    the files' ``HEAD_LABELS``, compared where both record them (the same width can name other labels)."""
    if set(a) != set(b) or any(np.shape(a[g]) != np.shape(b[g]) for g in a) or \
            (labels_a and labels_b and any(labels_a.get(g) != labels_b.get(g) for g in a)):
        raise ValueError(f"Cannot fuse {what}: their groups or label vocabularies differ")
    return {g: (a[g] + b[g]) / 2 for g in a}


# --------------------------------------------------------------------------- writing

def open_h5(path: Path, mode: str) -> h5py.File:
    """``h5py.File``, with HDF5's file-lock error turned into a message that says what to do."""
    try:
        return h5py.File(path, mode)
    except OSError as err:
        if not in_use(err):
            raise
        raise ValueError(f"{path} is in use by another process (another 'retrieval embed' of the same --out, "
                         "or a rebuild, still running?); wait for it to finish or stop it") from None


def partial_mismatch(f: h5py.File, n: int, meta: dict, covers: dict) -> str | None:
    """Why a work file cannot be resumed by this job (None when it can)."""
    if "outputs" not in f:
        return "it was written by an older version (one dataset per output)"
    stored = json.loads(f.attrs.get("job", "{}"))
    changed = sorted(k for k in set(stored) | set(meta) if stored.get(k) != meta.get(k))
    if changed:
        return f"it was made by another job ({', '.join(changed)} differ)"
    if len(f["ok"]) != n:
        return f"it covers {len(f['ok'])} images, this job {n}"
    return digest_change(json.loads(f.attrs.get("covers", "null")), covers)


def open_partial(path: Path, n: int, dims: dict[str, int], meta: dict, covers: dict) -> tuple[h5py.File, int]:
    """The resumable work file at ``path``: one float32 dataset ``outputs`` [n, sum of ``dims``] whose
    columns (attribute ``columns``: name -> [start, stop]) hold the datasets of EMB.h5 side by side,
    so a batch is one write (one dataset per output cost h5py ~50 ms a batch at 24 groups), ``ok``
    and ``done``. Reopened when made by this job for the same images (same paths in the same
    order, same file sizes and times), else created afresh."""
    if path.exists():
        try:
            f = open_h5(path, "r+")  # another process's lock is a ValueError saying so, never a restart
        except OSError as err:  # cut short (a full disk, a kill mid-write): our own work file, so made again
            if not os.access(path, os.R_OK | os.W_OK):  # not its contents but where it is (permission, a
                raise  # read-only disk): said as such
            logger.warning("Not resuming %s: it cannot be read (%s); starting from zero", path, err)
            path.unlink()
        else:
            why = partial_mismatch(f, n, meta, covers)
            if why is None:
                logger.info("Resuming %s at %d/%d images", path, f.attrs["done"], n)
                return f, int(f.attrs["done"])
            f.close()
            logger.warning("Not resuming %s: %s; starting from zero", path, why)
    f = open_h5(path, "w")
    ends = np.cumsum(list(dims.values())).tolist()
    columns = {name: [end - dim, end] for (name, dim), end in zip(dims.items(), ends)}
    # HDF5 chunks may not outsize an empty dataset
    f.create_dataset("outputs", (n, ends[-1]), dtype="float32", chunks=(min(n, 64), ends[-1]) if n else None)
    f.create_dataset("ok", (n,), dtype="bool")
    f.attrs["job"], f.attrs["done"] = json.dumps(meta, sort_keys=True), 0
    f.attrs["covers"], f.attrs["columns"] = json.dumps(covers), json.dumps(columns)
    return f, 0


# --------------------------------------------------------------------------- reading in blocks

class BlockReader:
    """EMB.h5 open for reading row blocks: ids, paths and attributes at once, vectors on demand, so
    that an index of millions of rows is filled without holding the file's vectors in memory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = open_file(path)
        try:
            check_layout(self.file, path)
        except EmbeddingsError:
            self.file.close()
            raise
        self.ids = np.asarray(self.file["ids"][...], dtype=np.int64).reshape(-1)
        self.paths = [str(p) for p in self.file["paths"].asstr()[...]]
        self.attrs = {name: decode_attr(name, value) for name, value in self.file.attrs.items()}
        self.datasets = {"vectors": self.file["vectors"],
                         **{f"groups/{group_name(k)}": ds for k, ds in self.file.get("groups", {}).items()}}

    def __enter__(self) -> "BlockReader":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    @property
    def dims(self) -> dict[str, int]:
        """{dataset: dimension}: "vectors" and "groups/<group>"."""
        return {name: int(ds.shape[1]) for name, ds in self.datasets.items()}

    def rows(self, dataset: str, start: int, stop: int) -> np.ndarray:
        """Rows start..stop of a 2-D dataset ("vectors" or "groups/<group>") as float32."""
        return np.asarray(self.datasets[dataset][start:stop], dtype=np.float32)

"""EMB.h5, the embeddings file (docs/formats.md): its one reader and writer (resumable work file,
atomic final file), and the scoring rules of what it holds. The evaluator, the index command and the web app read it only through here; ``indexer/``
takes the arrays. h5py and numpy only."""
from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from retrieval.data.catalog import digest_change

logger = logging.getLogger(__name__)

SIGMOID_GROUPS = "sigmoid_groups"  # attribute: groups whose head scores are independent sigmoids
JSON_ATTRS = ("groups", "skipped", SIGMOID_GROUPS)


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


def read_embeddings(path: str | Path) -> Embeddings:
    """Vectors, ids, paths, group vectors and attributes, with every dataset's row count checked."""
    with open_file(path) as f:
        missing = [name for name in ("vectors", "ids", "paths") if name not in f]
        if missing:
            raise EmbeddingsError(f"{path} lacks dataset(s) {', '.join(missing)}; it has: {', '.join(f.keys()) or 'nothing'}")
        vectors = np.asarray(f["vectors"][...], dtype=np.float32)
        if vectors.ndim != 2:
            raise EmbeddingsError(f"{path}: dataset 'vectors' must be 2-D, has shape {vectors.shape}")
        emb = Embeddings(vectors, np.asarray(f["ids"][...], dtype=np.int64).reshape(-1),
                         [str(p) for p in f["paths"].asstr()[...]],
                         {g: np.asarray(ds[...], dtype=np.float32) for g, ds in f.get("groups", {}).items()},
                         {name: decode_attr(name, value) for name, value in f.attrs.items()})
    for name, arr in {"ids": emb.ids, "paths": emb.paths, **{f"groups/{g}": a for g, a in emb.group_vectors.items()}}.items():
        if len(arr) != len(vectors):
            raise EmbeddingsError(f"{path}: dataset {name!r} has {len(arr)} rows, 'vectors' has {len(vectors)}")
    logger.info("Read %d embeddings of dimension %d from %s", *vectors.shape, path)
    return emb


def read_probabilities(path: str | Path, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Head probabilities ``probs/<group>`` of the given rows ({} when the file has none)."""
    with open_file(path) as f:
        if "probs" not in f:
            return {}
        return {g: f[f"probs/{g}"][:][rows] for g in f["probs"]}


def group_vectors(probs: dict[str, np.ndarray], sigmoid_groups) -> dict[str, np.ndarray]:
    """Group-focused vectors from head probabilities, ranked by inner product: the rule for the
    model's own outputs and for fused scores alike.

    Softmax groups keep their probabilities (p·q is the model's probability that two items share
    the label). Sigmoid groups are L2-normalised (cosine): p·q there would favour items with many
    likely labels (demo catalog's colours: 67.5 vs 38.2 mAP@50)."""
    out = {}
    for g, p in probs.items():
        v = np.asarray(p, dtype=np.float32)
        if g in sigmoid_groups:
            v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        out[g] = v
    return out


def fuse_probabilities(a: dict[str, np.ndarray], b: dict[str, np.ndarray], what: str = "the two models") -> dict:
    """Score fusion: the mean of two models' class scores, group by group."""
    if set(a) != set(b) or any(np.shape(a[g]) != np.shape(b[g]) for g in a):
        raise ValueError(f"Cannot fuse {what}: their groups or label vocabularies differ")
    return {g: (a[g] + b[g]) / 2 for g in a}


# --------------------------------------------------------------------------- writing

def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def open_h5(path: Path, mode: str) -> h5py.File:
    """``h5py.File``, with HDF5's file-lock error turned into a message that says what to do."""
    try:
        return h5py.File(path, mode)
    except OSError as err:
        if not isinstance(err, BlockingIOError) and "lock" not in str(err).lower():
            raise
        raise ValueError(f"{path} is in use by another process (another 'retrieval embed' of the same --out, "
                         "or a rebuild, still running?); wait for it to finish or stop it") from None


def partial_mismatch(f: h5py.File, n: int, meta: dict, covers: dict) -> str | None:
    """Why a work file cannot be resumed by this job (None when it can)."""
    stored = json.loads(f.attrs.get("job", "{}"))
    changed = sorted(k for k in set(stored) | set(meta) if stored.get(k) != meta.get(k))
    if changed:
        return f"it was made by another job ({', '.join(changed)} differ)"
    if len(f["ok"]) != n:
        return f"it covers {len(f['ok'])} images, this job {n}"
    return digest_change(json.loads(f.attrs.get("covers", "null")), covers)


def open_partial(out: Path, n: int, dims: dict[str, int], meta: dict, covers: dict) -> tuple[h5py.File, int]:
    """The resumable work file: reopened when it was made by this job for the same images (same
    paths in the same order, same file sizes and times), else created afresh."""
    path = partial_path(out)
    if path.exists():
        f = open_h5(path, "r+")
        why = partial_mismatch(f, n, meta, covers)
        if why is None:
            logger.info("Resuming %s at %d/%d images", path, f.attrs["done"], n)
            return f, int(f.attrs["done"])
        f.close()
        logger.warning("Not resuming %s: %s; starting from zero", path, why)
    f = open_h5(path, "w")
    for name, dim in dims.items():
        f.create_dataset(name, (n, dim), dtype="float32", chunks=(min(n, 256), dim))
    f.create_dataset("ok", (n,), dtype="bool")
    f.attrs["job"], f.attrs["done"] = json.dumps(meta, sort_keys=True), 0
    f.attrs["covers"] = json.dumps(covers)
    return f, 0


def finalize(out: Path, items, meta: dict, transform=None) -> dict:
    """Write the final EMB.h5 from the work file (readable rows only) atomically; ``transform``
    (e.g. standardisation) applies to the shared vectors."""
    src = partial_path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    with open_h5(src, "r") as f, open_h5(tmp, "w") as g:
        ok = f["ok"][:]
        vectors = f["vectors"][:][ok]
        g.create_dataset("vectors", data=transform(vectors) if transform else vectors)
        g.create_dataset("ids", data=np.array([it.row_id for it in items], dtype=np.int64)[ok])
        g.create_dataset("paths", data=[it.image for it, k in zip(items, ok) if k], dtype=h5py.string_dtype())
        groups = sorted(f["groups"].keys()) if "groups" in f else []
        for name in groups:
            g.create_dataset(f"groups/{name}", data=f[f"groups/{name}"][:][ok])
            g.create_dataset(f"probs/{name}", data=f[f"probs/{name}"][:][ok])
        skipped = [it.image for it, k in zip(items, ok) if not k]
        attrs = {**meta, "dimension": int(vectors.shape[1]), "created": dt.datetime.now(dt.timezone.utc).isoformat(),
                 "groups": json.dumps(groups), "skipped": json.dumps(skipped), "count": int(ok.sum())}
        g.attrs.update(attrs)
    tmp.replace(out)
    src.unlink()
    return attrs


# --------------------------------------------------------------------------- reading in blocks

class BlockReader:
    """EMB.h5 open for reading row blocks: ids, paths and attributes at once, vectors on demand, so
    that an index of millions of rows is filled without holding the file's vectors in memory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = open_file(path)
        missing = [name for name in ("vectors", "ids", "paths") if name not in self.file]
        if missing:
            self.file.close()
            raise EmbeddingsError(f"{path} lacks dataset(s) {', '.join(missing)}; "
                                  f"it has: {', '.join(self.file.keys()) or 'nothing'}")
        self.ids = np.asarray(self.file["ids"][...], dtype=np.int64).reshape(-1)
        self.paths = [str(p) for p in self.file["paths"].asstr()[...]]
        self.attrs = {name: decode_attr(name, value) for name, value in self.file.attrs.items()}
        self.datasets = {"vectors": self.file["vectors"],
                         **{f"groups/{g}": ds for g, ds in self.file.get("groups", {}).items()}}
        for name, ds in self.datasets.items():
            if ds.ndim != 2 or len(ds) != len(self.ids) or len(self.paths) != len(self.ids):
                self.file.close()
                raise EmbeddingsError(f"{path}: dataset {name!r} has shape {ds.shape}; "
                                      f"'ids' has {len(self.ids)} rows, 'paths' {len(self.paths)}")

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

"""Run a model over catalog items or image files: embeddings, head probabilities, group vectors."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from retrieval.atomic import in_use
from retrieval.data import embfile
from retrieval.data.catalog import Catalog, Item
from retrieval.data.datasets import ImageCache, ImageDataset, collate_images, loader_workers
from retrieval.data.images import image_tensor, normalize_batch
from retrieval.net.backbones import fold_batchnorm
from retrieval.net.model import QUERY_VIEWS, RetrievalModel
from retrieval.net.trunkcache import TrunkCache, cache_key, cache_serves

logger = logging.getLogger(__name__)


@dataclass
class Outputs:
    """Model outputs of a batch of items (positions into the item list)."""

    positions: np.ndarray
    vectors: np.ndarray
    probs: dict[str, np.ndarray]
    group_vectors: dict[str, np.ndarray]


@torch.no_grad()
def outputs_from_pooled(model: RetrievalModel, pooled: torch.Tensor, positions, heads: bool = True,
                        shared_view: str | None = None) -> Outputs:
    """Shared view's vectors (``embfile.shared_vectors``; ``shared_view`` as named there, the
    model's own by default), probabilities and group vectors from pooled trunk features."""
    emb = model.embed_pooled(pooled)
    probs, group_vectors = {}, {}
    if heads:
        logits = model.group_logits(emb, pooled)
        probs = {g: model.probabilities(g, z).float().cpu().numpy() for g, z in logits.items()}
        group_vectors = embfile.group_vectors(probs, model.sigmoid_groups, prior=model.group_view_prior)
    vectors = embfile.shared_vectors(emb.float().cpu().numpy(), probs, model.sigmoid_groups,
                                     shared_view or model.config.shared_view, model.shared_view_weights)
    return Outputs(np.asarray(positions), vectors, probs, group_vectors)


def open_trunk_cache(path, model: RetrievalModel, catalog: Catalog, start: int) -> TrunkCache | None:
    """A trunk cache usable for this model and catalog, or None (with the reason logged)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            key, done = f.attrs.get("key"), int(f.attrs.get("done", 0))
    except OSError as err:  # truncated or not HDF5: derived data, so the images serve instead
        if in_use(err):
            raise ValueError(f"trunk cache {path} is in use by another process (a training run still filling "
                             "it?); wait for it to finish, or embed without --trunk-cache") from None
        logger.warning("%s cannot be read (%s): computing from images", path, err)
        return None
    if not cache_serves(key, cache_key(model, start, catalog.items), model, start) or done < len(catalog):
        logger.warning("%s does not match this model and catalog: computing from images", path)
        return None
    return TrunkCache(path, model, start)


def cached_pooled(model: RetrievalModel, cache: TrunkCache, rows: torch.Tensor, view: int, start: int, device):
    """Pooled features of cached rows, original (view 0) or mirrored (view 1)."""
    prefix, act, weight = (t if t is None else t.to(device)
                           for t in cache.inputs(rows, torch.full((len(rows),), view, dtype=torch.long)))
    return model.pooled_features(act, start, prefix, weight)


@torch.no_grad()
def iter_outputs(model: RetrievalModel, catalog: Catalog, items: list[Item], device, batch_size: int = 64,
                 workers: int | None = None, image_cache: ImageCache | None = None,
                 trunk_cache: TrunkCache | None = None, start: int = 0, heads: bool = True,
                 bad: list | None = None):
    """Yield ``Outputs`` for consecutive batches of ``items``; unreadable ones go to ``bad``."""
    model.eval().to(device)
    if trunk_cache is not None:
        rows = torch.tensor([it.row_id for it in items], dtype=torch.long)
        for chunk in torch.arange(len(items)).split(batch_size):
            ok = torch.from_numpy(trunk_cache.ok[rows[chunk].numpy()])
            if bad is not None:
                bad.extend(items[i].image for i in chunk[~ok].tolist())
            chunk = chunk[ok]
            views = range(model.catalog_views)
            pooled = sum(cached_pooled(model, trunk_cache, rows[chunk], view, start, device) for view in views)
            yield outputs_from_pooled(model, pooled / len(views), chunk.numpy(), heads)
        return
    dataset = ImageDataset(catalog, items, model.config.image_size, image_cache)
    cuda, n_workers = torch.device(device).type == "cuda", loader_workers(workers)
    # workers decode (or read the image cache) several batches ahead; pinned pages copy to the GPU asynchronously
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=n_workers, collate_fn=collate_images,
                        pin_memory=cuda, prefetch_factor=4 if n_workers else None)
    units = fold_batchnorm(model.trunk.units)  # the same function, faster (see fold_batchnorm)
    for images, index, failed in loader:
        if bad is not None:
            bad.extend(items[i].image for i in failed)
        if images is None:
            continue
        x = normalize_batch(images.to(device, non_blocking=True))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            pooled = model.view_features(x, units=units)
        yield outputs_from_pooled(model, pooled.float(), index.numpy(), heads)


@torch.no_grad()
def predict_images(model: RetrievalModel, paths, device="cpu") -> list[dict[str, np.ndarray]]:
    """Per-group label probabilities of image files (raises ImageError on bad files)."""
    model.eval().to(device)
    results = []
    for path in paths:
        x = image_tensor(path, model.config.image_size).to(device)
        pooled = model.view_features(x, QUERY_VIEWS)
        logits = model.group_logits(model.embed_pooled(pooled), pooled)
        results.append({g: model.probabilities(g, z)[0].cpu().numpy() for g, z in logits.items()})
    return results


def standardize(vectors: np.ndarray) -> np.ndarray:
    """Z-score each dimension over the set, then L2-normalise rows."""
    centred = (vectors - vectors.mean(0)) / (vectors.std(0) + 1e-6)
    return F.normalize(torch.from_numpy(centred.astype(np.float32)), dim=1).numpy()


@torch.no_grad()
def describe_image(model: RetrievalModel, image, device="cpu", shared_view: str | None = None) -> Outputs:
    """Embedding, head probabilities and group vectors of one PIL image (for search by photo),
    from the image alone (no mirror view); ``shared_view``: what the index's shared view holds
    (``outputs_from_pooled``)."""
    from retrieval.data.images import to_rgb, to_uint8_array

    array = to_uint8_array(to_rgb(image), model.config.image_size)
    x = normalize_batch(torch.from_numpy(array).unsqueeze(0).to(device))
    model.eval().to(device)
    return outputs_from_pooled(model, model.view_features(x, QUERY_VIEWS), np.zeros(1, dtype=np.int64),
                               shared_view=shared_view)

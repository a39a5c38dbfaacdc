"""Run a training job: data, model, epochs, validation, checkpoints and resume."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from retrieval.data.catalog import items_digest, read_catalog, training_catalog
from retrieval.data.cooccurrence import label_cooccurrence, prior_state
from retrieval.data.datasets import (ImageCache, ImageDataset, build_targets, collate_images, drop_labels,
                                     loader_workers, missing_at_random, parse_dropout_profile)
from retrieval.data.images import augment_batch, normalize_batch
from retrieval.devices import Collectives, resolve_device, setup_distributed
from retrieval.atomic import atomic_write, hold_lock
from retrieval.net.checkpoint import atomic_save, load_checkpoint, make_checkpoint
from retrieval.net.model import LEGACY, create_model, model_options
from retrieval.net.trunkcache import build_trunk_cache
from retrieval.train import sampling
from retrieval.train.config import (AUTO_MIN_VALIDATION, EARLY_LEARNING, FILL_MIN_MISSING, FILL_MISSING,
                                    FULL_TUNING_MIN_ITEMS, SIGMOID_WEIGHT_UNDER_EARLY_LEARNING, CachedForward,
                                    TrainConfig, freeze_units, make_optimizer, make_scheduler, parse_early_learning,
                                    parse_fill_missing, parse_lr_steps, resolve_blocks, resolve_epochs,
                                    resolve_trainable, split_validation, write_config, write_json)
from retrieval.train.loop import (LossSettings, TrainState, memorising, selection_score, train_one_epoch,
                                  unlearnt_groups, validate)
from retrieval.train.losses import (EarlyLearning, balancing_divisors, group_weights, label_weights, resolve_group_loss,
                                    resolve_loss_norm)

logger = logging.getLogger(__name__)


# what the first run of --early-learning auto leaves beside the second
ASIDE = {"best.pt": "best-without-early-learning.pt", "metrics.json": "metrics-without-early-learning.json"}
# what the run before --fill-missing's leaves beside it
FILL_ASIDE = {"best.pt": "best-before-filling.pt", "metrics.json": "metrics-before-filling.json"}
# a run's files besides last.pt: a folder holding any is a run, which a fresh start would overwrite
RUN_FILES = ("best.pt", "metrics.json", *ASIDE.values(), *FILL_ASIDE.values())
# training options a resumed run must keep: the saved optimiser and schedule hold them (a changed one was
# ignored, or failed: --optimizer sgd on AdamW's state), and the epochs' seeds follow --seed
RESUME_FIXED = ("optimizer", "lr", "momentum", "weight_decay", "batch_size", "schedule", "lr_steps", "trunk_lr_scale",
                "seed", "select_by")  # select_by: the run's best scores (mAP, or minus the loss) compare only so
# last.pt and metrics.json are written at an epoch's end when best.pt is (validation improved), at the
# last epoch, and otherwise at most this often: a 60-item catalogue's 700 one-step epochs spent 108 of
# their 146 s writing them every epoch (a 44 MB last.pt and an ever longer history)
CHECKPOINT_EVERY_S = 30.0


def option_flag(name: str, value) -> str:
    """The ``retrieval train`` option that sets model field ``name`` to ``value``."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    return f"{flag} {value}"


class Job:
    """Everything one training run holds: data, targets, model, loss settings, state."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg = replace(cfg, loss_norm=resolve_loss_norm(cfg.loss_norm, cfg.method))  # config.yaml says which
        self.out = Path(cfg.out)
        self.rank, self.world, self.device = setup_distributed(resolve_device(cfg.device))
        self.collectives = Collectives(self.device) if self.world > 1 else None
        self.main = self.rank == 0
        # images mode: loaders made at the first epoch and kept for the others; the order set per epoch
        self.train_loader = self.val_loader = None
        self._last = None  # last.pt when already read for --resume
        self._run_lock = None  # RUN/.train.lock's descriptor while the main rank runs (hold_run_folder)
        self._saved_at = time.monotonic()  # when last.pt was last written (CHECKPOINT_EVERY_S)
        self.filled = None  # per softmax group, each training item's filled label (-1: none), in --fill-missing's run
        self.epoch_order = sampling.EpochBatches(cfg.batch_size)
        torch.manual_seed(cfg.seed)
        self.catalog = training_catalog(read_catalog(cfg.catalog), cfg.groups)  # groups with training labels
        self._prepare_items()
        self._prepare_model()
        self._prepare_loss()
        self.steps = self.steps_per_epoch()  # every rank takes as many
        self.cfg = replace(self.cfg, epochs=resolve_epochs(self.cfg.epochs, self.steps, self.cfg.min_steps))

    def _prepare_items(self):
        cfg, catalog = self.cfg, self.catalog
        items, val = catalog.split_items("train"), catalog.split_items("val")
        if cfg.label_dropout:
            keep = parse_dropout_profile(cfg.label_dropout, len(catalog.groups))
            items = drop_labels(items, catalog.groups, keep, cfg.seed)
            val = drop_labels(val, catalog.groups, keep, cfg.seed + 1) if val else val
        if val:  # the catalogue's own validation items (--val-fraction is not used)
            self.train_items, self.val_items = items, val
        else:
            self.train_items, self.val_items = split_validation(items, cfg.val_fraction)
        if not self.train_items:
            raise ValueError(f"{catalog.root}: no training items (split column has no 'train' rows?)")
        if len(self.train_items) < 2:  # a batch of one is skipped (batch norm): nothing would train
            raise ValueError(f"{catalog.root}: 1 training item ({self.train_items[0].image}) beside "
                             f"{len(self.val_items)} validation item(s); at least 2 are needed to train")
        self.targets = build_targets(self.train_items, catalog.vocab)
        self.val_targets = build_targets(self.val_items, catalog.vocab)

    def _prepare_model(self):
        cfg = self.cfg
        options = model_options(cfg)
        # the size rule is for the defaults; a paper's recipe fine-tunes the whole trunk on a GPU
        blocks = resolve_blocks(cfg.trainable_blocks, self.device, None if cfg.recipe else len(self.train_items))
        if cfg.trainable_blocks == "auto" and self.device.type == "cuda" and blocks == "0" and self.main:
            logger.info("--trainable-blocks auto: the trunk stays frozen for %d training items (under %d); "
                        "--trainable-blocks all fine-tunes it", len(self.train_items), FULL_TUNING_MIN_ITEMS)
        self.model = create_model(cfg.backbone, self.catalog.vocab, cfg.embed_dim, method=cfg.method,
                                  multi_label_groups=self.catalog.multi_label_groups(), weights=cfg.weights,
                                  frozen_trunk=blocks != "all" and int(blocks) == 0,
                                  strict_taps=not cfg.resume, **options)  # a run trained before the check resumes
        if cfg.label_attention and self.catalog.multi_label_groups() and not self.model.attended_groups and \
                cfg.method != "multi-label" and self.main:
            logger.warning("label attention is off for this run: it needs the learned colour weighting "
                           "(--colour-weighting learned, with --colour-bins); the multi-label groups get plain heads")
        self.start, self.mode = resolve_trainable(cfg, blocks, len(self.model.trunk))
        freeze_units(self.model, self.start, cfg.freeze_bn)
        self.model.to(self.device)
        if self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)

    def _prepare_loss(self):
        cfg = self.cfg
        groups = self.catalog.groups
        self.kinds = {g: resolve_group_loss(cfg.group_loss, g, self.model.config.multi_label_groups, cfg.method)
                      for g in groups}
        self.weights = group_weights(cfg.method, self.targets.counts(), cfg.smoothing_c)
        if cfg.weighting == "none":
            self.weights = {g: 1.0 for g in groups}
        self.class_weights = None
        if cfg.weighting == "label":
            self.class_weights = {g: w.to(self.device) for g, w in label_weights(self.targets.label_counts(),
                                                                               cfg.smoothing_c).items()}
        self.classes = None
        if cfg.sampling != "none" or cfg.range_loss:
            group = cfg.sampling_group or cfg.range_group
            if group not in groups:
                raise ValueError(f"--sampling-group/--range-group {group!r} unknown; choose one of: {', '.join(groups)}")
            self.classes = sampling.item_classes(self.targets.multi_hot[group])
            self.class_group = group
        softmax = {g: len(self.catalog.vocab[g]) for g in self.softmax_groups()}
        # what each single-label group's labels say of the others' on the training items, for the group
        # views' prior (cooccurrence.py), whose strength each validation chooses
        single = [g for g in softmax if g not in self.model.sigmoid_groups]
        self.cooccurrence = label_cooccurrence(self.train_items, self.catalog.vocab, single) if len(single) > 1 else {}
        # (the multi-label method has no softmax group, so no early learning at all)
        sigmoid = [g for g in self.catalog.groups if self.kinds[g] == "bce"] if cfg.early_learning_sigmoid else []
        held = {**softmax, **{g: len(self.catalog.vocab[g]) for g in sigmoid}}
        weight = parse_early_learning(cfg.early_learning)
        weight = 0.0 if weight == "auto" else weight  # auto: a first run without (see run)
        gather = self.collectives.all_gather if self.collectives is not None else None
        counts = self.targets.label_counts()
        divisors = balancing_divisors({g: counts[g] for g in softmax}, cfg.early_learning_balance) \
            if cfg.early_learning_balance else None
        self.early_learning = EarlyLearning(held, len(self.train_items), weight, cfg.early_learning_momentum,
                                            self.device, gather, cfg.batch_size, sigmoid, divisors,
                                            [g for g in self.model.attended_groups if g in sigmoid]) \
            if weight and softmax else None
        if weight and not softmax and self.main:
            logger.warning("--early-learning %g is off: it holds the single-label (softmax) groups, and this run has "
                           "none (the multi-label method, or --groups of multi-label groups only)", weight)
        if self.early_learning is not None:
            # the sigmoid groups are weighted up so as to keep a share of the loss (else a multi-label
            # colour group falls below the off-the-shelf trunk; x 2.5 measured best against 1 and 4 at
            # weight 3, held by early learning too or not: README). The same x 2.5 at weight 4 (noisy
            # multicolour, three seeds): group view +0.3 and shared +0.2 against x 3 = 1 + weight/2
            self.weights = {g: w * SIGMOID_WEIGHT_UNDER_EARLY_LEARNING if self.kinds[g] == "bce" else w
                            for g, w in self.weights.items()}

    def describe(self) -> str:
        """Start-of-run summary: data, mode, loss kinds and weights."""
        source = ("the val split" if self.catalog.split_items("val")
                  else f"{self.cfg.val_fraction:g} of the train split")
        lines = [f"{len(self.train_items)} training / {len(self.val_items)} validation items ({source}), "
                 f"method {self.cfg.method}, backbone {self.cfg.backbone}, device {self.device}, "
                 f"world {self.world}, input {self.mode}, "
                 f"trainable trunk units {self.start}..{len(self.model.trunk) - 1}, "
                 f"{self.cfg.epochs} epochs of {self.steps} steps",
                 f"{'group':<20} {'labelled':>8} {'loss':>4} {'weight':>7}"]
        for g, n in self.targets.counts().items():
            lines.append(f"{g:<20} {n:>8} {self.kinds[g]:>4} {self.weights[g]:>7.3f}")
        return "\n".join(lines)

    # ----- inputs -----
    def prepare_inputs(self):
        """Build the trunk cache (cached mode) or the image loader settings (image mode)."""
        cfg = self.cfg
        self.image_cache = ImageCache(cfg.image_cache) if cfg.image_cache else None
        self.bad_rows: set[int] = set()
        self.train_rows = self.val_rows = None  # the items' rows of the trunk cache (cached mode)
        if self.mode != "cached":
            return
        path = Path(cfg.trunk_cache) if cfg.trunk_cache else self.out / "trunk-cache.h5"
        if self.main:
            build_trunk_cache(self.model, self.catalog, self.catalog.items, self.start, path, self.device,
                              batch_size=cfg.batch_size, image_cache=self.image_cache, workers=cfg.workers)
        if self.world > 1:
            dist.barrier()
        from retrieval.net.trunkcache import TrunkCache
        budget = None if cfg.cache_memory is None else int(cfg.cache_memory * 2**30)
        self.trunk_cache = TrunkCache(path, self.model, self.start, max_memory=budget)
        self.train_rows = torch.tensor([it.row_id for it in self.train_items])
        self.val_rows = torch.tensor([it.row_id for it in self.val_items], dtype=torch.long)
        self.bad_rows = {i for i, it in enumerate(self.train_items) if not self.trunk_cache.ok[it.row_id]}

    def cached_batch(self, positions: torch.Tensor, rows: torch.Tensor, flip: torch.Tensor):
        """Cached trunk outputs of the items at ``positions`` (rows of the catalog)."""
        prefix, act, weight = self.trunk_cache.inputs(rows[positions], flip)
        return tuple(t.to(self.device) if t is not None else None for t in (prefix, act, weight))

    def image_loader(self, items: list, batch_sampler=None) -> DataLoader:
        """A loader of ``items``' decoded images whose worker processes stay up from epoch to epoch
        (started afresh, 15 workers cost a 384-image pass ~0.2 s on the 2-core machine; on a GPU an
        epoch of a few thousand images takes a few seconds)."""
        n_workers = loader_workers(self.cfg.workers)
        dataset = ImageDataset(self.catalog, items, self.cfg.image_size, self.image_cache)
        batching = dict(batch_sampler=batch_sampler) if batch_sampler is not None else dict(batch_size=self.cfg.batch_size)
        # the loader's own generator draws its worker seeds (nothing in the workers is random): had it
        # drawn from the global stream, reseeded every epoch for augmentation, a resumed run's first
        # epoch (a new loader) would augment otherwise than the same epoch run straight through
        return DataLoader(dataset, **batching, num_workers=n_workers, collate_fn=collate_images,
                          pin_memory=self.device.type == "cuda", persistent_workers=n_workers > 0,
                          generator=torch.Generator())

    def image_batches(self, order: np.ndarray):
        """Yield (positions, augmented normalised images) for an epoch in image mode."""
        if self.train_loader is None:
            self.train_loader = self.image_loader(self.train_items, self.epoch_order)
        self.epoch_order.order = order  # read when the loop below starts the epoch's iterator
        for images, index, bad in self.train_loader:
            self.bad_rows.update(bad)
            if not self.all_ranks_have(images is not None and len(images) > 1):
                # every rank skips together (a lone skip would hang the others' all-reduce); one
                # image is no batch for the embedding layer's batch norm
                continue
            x = augment_batch(images.to(self.device, non_blocking=True))
            x = normalize_batch(x)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            yield index, x

    def all_ranks_have(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (itself when not distributed)."""
        if self.world == 1:
            return flag
        return bool(self.collectives.all_reduce(torch.tensor([int(flag)]), dist.ReduceOp.MIN).item())

    def share_bad_rows(self) -> None:
        """Unreadable images found by any rank become known to all, so the next epochs leave the
        same items out of every rank's order before sharding."""
        if self.world > 1:
            mask = torch.zeros(len(self.train_items), dtype=torch.uint8)
            mask[torch.tensor(sorted(self.bad_rows), dtype=torch.long)] = 1
            mask = self.collectives.all_reduce(mask, dist.ReduceOp.MAX)
            self.bad_rows = set(torch.nonzero(mask).flatten().tolist())

    # ----- epochs -----
    def epoch_batches(self, epoch: int):
        """Yield (positions, network inputs) of this rank's share of an epoch."""
        n = len(self.train_items)
        order = sampling.epoch_order(n, epoch, self.cfg.seed, self.rank, self.world, self.classes,
                                     self.cfg.sampling, exclude=np.array(sorted(self.bad_rows), dtype=np.int64),
                                     target=self.cfg.sampling_target)
        if self.mode == "images":
            yield from self.image_batches(order)
            return
        gen = torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch)
        for positions in sampling.batches(order, self.cfg.batch_size):
            if len(positions) < 2:
                continue  # a final batch of one: batch norm cannot train on it (same on every rank)
            positions = torch.from_numpy(positions)
            flip = (torch.rand(len(positions), generator=gen) < 0.5).long()
            yield positions, self.cached_batch(positions, self.train_rows, flip)

    def loss_settings(self) -> LossSettings:
        """How this run's batches are scored."""
        cfg = self.cfg
        return LossSettings(self.kinds, self.weights, self.class_weights, cfg.label_smoothing, cfg.metric_scale,
                            cfg.head_scale, cfg.method == "multi-label", cfg.contrastive, cfg.range_loss, self.classes,
                            cfg.loss_norm, cfg.range_distance, cfg.head_fit, self.early_learning)

    def val_batches(self):
        """Validation inputs, unaugmented."""
        if self.mode == "cached":
            yield from self.unaugmented_batches(self.val_items, self.val_rows)
            return
        if self.val_loader is None:
            self.val_loader = self.image_loader(self.val_items)
        yield from self.unaugmented_batches(self.val_items, loader=self.val_loader)

    def unaugmented_batches(self, items: list, rows: torch.Tensor | None = None, loader: DataLoader | None = None):
        """Yield (positions, inputs) of ``items`` unflipped: in cached mode from their trunk cache
        ``rows`` (unreadable images left out), else decoded by ``loader`` (a new one by default)."""
        if self.mode == "cached":
            index = torch.arange(len(items))
            ok = self.trunk_cache.ok[rows.numpy()] if len(rows) else np.array([], bool)
            for positions in index[torch.from_numpy(ok)].split(self.cfg.batch_size):
                yield positions, self.cached_batch(positions, rows, torch.zeros(len(positions), dtype=torch.long))
            return
        for images, positions, _ in loader if loader is not None else self.image_loader(items):
            if images is not None:
                yield positions, normalize_batch(images.to(self.device))

    # ----- run -----
    def build_state(self) -> TrainState:
        """The loop's state: the module trained (cached forward or the whole model, DDP-wrapped under
        torchrun), its optimiser and schedule."""
        cfg = self.cfg
        forward = CachedForward(self.model, self.start) if self.mode == "cached" else self.model
        net = forward
        if self.world > 1:
            net = DistributedDataParallel(forward, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        optimizer = make_optimizer(self.model, cfg)
        scheduler = make_scheduler(optimizer, self.steps * cfg.epochs, min(self.steps, 100), cfg.schedule, self.steps,
                                   parse_lr_steps(cfg.lr_steps), cfg.lr_gamma)
        return TrainState(self.model, net, forward, optimizer, scheduler, self.device, self.loss_settings(),
                          self.start, self.world, progress=self.main, freeze_bn=cfg.freeze_bn)

    def steps_per_epoch(self) -> int:
        """Optimisation steps of an epoch on this rank (every rank takes as many)."""
        cfg = self.cfg
        return -(-len(sampling.epoch_order(len(self.train_items), 0, cfg.seed, self.rank, self.world,
                                           self.classes, cfg.sampling, target=cfg.sampling_target)) // cfg.batch_size)

    def checkpoint(self, optimizer, scheduler, epoch: int, history: list, best: float) -> dict:
        """The checkpoint dict at the end of an epoch (``best``: the best selection score so far)."""
        extra = {"early_learning": self.early_learning.state_dict()} if self.early_learning is not None else {}
        if self.filled is not None:
            extra["filled_labels"] = self.filled
        extra["training_items"] = self.items_key()
        if history and history[-1].get("shared_view_weights"):  # this epoch's: the weights of these heads
            extra["shared_view_weights"] = history[-1]["shared_view_weights"]
        if history and history[-1].get("group_view_prior"):  # this epoch's, with the matrices it mixes by
            extra["group_view_prior"] = prior_state(history[-1]["group_view_prior"], self.cooccurrence)
        return make_checkpoint(self.model, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                               epoch=epoch, best_score=best, history=history, group_weights=self.weights,
                               train_config=asdict(self.cfg), start_unit=self.start, input_mode=self.mode, **extra)

    def best_of(self, ckpt: dict) -> dict:
        """best.pt's content from an epoch's checkpoint: no optimiser, schedule or early-learning state,
        and how many labels were filled rather than which."""
        kept = {k: v for k, v in ckpt.items() if k not in ("optimizer", "scheduler", "early_learning")}
        if isinstance(ckpt.get("filled_labels"), dict):
            kept["filled_labels"] = {g: int((f >= 0).sum()) for g, f in ckpt["filled_labels"].items()}
        return kept

    def restore_best(self, ckpt: dict, history: list, scores: list[float]) -> None:
        """Write best.pt from last.pt when last.pt's epoch is the run's best (``scores``: each epoch of
        ``history``'s selection score) and best.pt scores lower (or is missing): a kill between the two
        writes of that epoch."""
        if not scores or scores.index(max(scores)) != len(scores) - 1 or history[-1].get("epoch") != ckpt["epoch"]:
            return
        path = self.out / "best.pt"
        try:  # best.pt scoring as well is kept: this epoch's, or the run before's (--early-learning auto and
            # --fill-missing keep the better run's best.pt, another epoch number)
            if load_checkpoint(path).get("best_score", -float("inf")) >= scores[-1]:
                return
        except (ValueError, OSError):  # missing or unreadable: written below
            pass
        atomic_save(self.best_of(ckpt), path)
        logger.warning("%s did not hold epoch %d, the best so far, written to last.pt before a stop: written from it",
                       path, ckpt["epoch"])

    def restore(self, optimizer, scheduler) -> tuple[int, list, float]:
        """Resume from RUN/last.pt when asked; returns (first epoch, history, best selection score)."""
        last = self.out / "last.pt"
        if not self.cfg.resume or not last.exists():  # without --resume, run() refused a last.pt at the start
            if self.cfg.resume:  # no epoch finished (check_run_folder refused a run's other files)
                logger.warning("--resume: %s has no last.pt (no epoch finished): nothing to resume from, "
                               "training from the start", self.out)
            return 0, [], -float("inf")
        ckpt, self._last = self._last_checkpoint(), None  # read once: see _last_checkpoint
        self.check_resumable(ckpt)
        self.model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if self.early_learning is not None:
            if "early_learning" in ckpt:
                fresh = self.early_learning.load_state_dict(ckpt["early_learning"])
                if fresh:
                    logger.warning("%s holds no early-learning targets for %s (saved before early learning held "
                                   "label attention); they start from zero", last, ", ".join(fresh))
            else:  # made without it (or before it existed): the targets start again from the resumed weights
                logger.warning("%s holds no early-learning targets; they start from zero (--early-learning 0 "
                               "continues it as it was trained)", last)
        logger.info("Resuming %s after epoch %d", self.out, ckpt["epoch"])
        history = ckpt.get("history", [])
        scores = [self.selection_score(r) for r in history]
        best = max(scores, default=-float("inf"))
        if self.main:
            self.restore_best(ckpt, history, scores)
        if not (self.out / "best.pt").exists():  # deleted: the next validated epoch writes one
            logger.warning("%s has no best.pt; the next epoch writes it (the best epoch before is not kept)", self.out)
            best = -float("inf")
        return ckpt["epoch"] + 1, history, best

    def run(self) -> list[dict]:
        """Train for the configured epochs; returns the per-epoch history. With ``--early-learning
        auto`` a finished run that looks like it learnt wrong labels (``memorising``: its best epoch,
        or its lowest validation loss before a rise, in the first quarter) trains again from the
        start with early learning, and the run that validates better is best.pt. Then, with
        ``--fill-missing`` where training labels are missing, a last run from the start with the
        confidently predicted ones filled in, and again the better run is best.pt."""
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.hold_run_folder()
            print(self.describe(), flush=True)
        self.check_run_folder()  # before the trunk pass, which it would redo
        if self.cfg.resume and self._last_checkpoint() is not None:  # before the trunk pass: it may be refused
            self.check_resumable(self._last_checkpoint())
        self.prepare_inputs()
        if self.cfg.resume and self._filled_run_started():
            history = self.train_with_filled_labels(resumed=True)
        else:
            history = self.train_with_early_learning_rule()
            confidence = self.fill_confidence()
            if confidence:
                history = self.train_with_filled_labels(confidence=confidence)
        if self.bad_rows and self.main:
            bad = sorted(self.train_items[i].image for i in self.bad_rows)
            logger.warning("%d unreadable training images were skipped: %s", len(bad), ", ".join(bad[:10]))
        if self.main:
            self.warn_unlearnt(history)
        return history

    def check_run_folder(self) -> None:
        """Refuse an --out whose run this job would overwrite: last.pt without --resume, or a run's
        other files (best.pt, metrics.json, copied or left after last.pt was deleted) with nothing
        to resume them from, which training from the start would replace."""
        if (self.out / "last.pt").exists():
            if not self.cfg.resume:
                raise FileExistsError(f"{self.out} already holds a run (last.pt); pass --resume to continue "
                                      "it or choose another --out")
            return
        held = [name for name in RUN_FILES if (self.out / name).exists()]
        if not held:
            return
        if self.cfg.resume:
            raise FileExistsError(f"{self.out} has no last.pt to resume from, but holds {', '.join(held)}, which "
                                  "training from the start would overwrite; choose another --out, or move "
                                  f"{' and '.join(held)} away")
        raise FileExistsError(f"{self.out} already holds a run ({', '.join(held)}) but no last.pt to resume it "
                              f"from; choose another --out, or move {' and '.join(held)} away to train afresh there")

    def warn_unlearnt(self, history: list[dict]) -> None:
        """Name each group the run predicts no better than its largest class (``unlearnt_groups``)."""
        for g, (accuracy, baseline, label) in unlearnt_groups(history, self.targets, self.val_targets,
                                                              self.cfg.select_by).items():
            logger.warning("group %r: validation accuracy %.3f at the best epoch, no better than always answering "
                           "its largest training class %r (%.3f): the photos may not show it, or its labels are too "
                           "noisy to learn; a group nothing is learnt from only adds noise to the shared embedding, "
                           "so consider training without it (--groups)", g, accuracy, self.catalog.vocab[g][label],
                           baseline)

    def train_with_early_learning_rule(self) -> list[dict]:
        """The run as configured, and with ``--early-learning auto`` the second run where the first
        memorised (see ``run``)."""
        auto = self.cfg.early_learning == "auto"
        second = auto and self.cfg.resume and self._second_run_started()
        if second:
            self.use_early_learning()
        history = self.train_epochs()
        if second:
            self.keep_the_better_run(history)
        elif self.early_learning is None and self.softmax_groups():  # auto's first run, or 0
            # on fewer validation items the best epoch is noise: a 30-item catalogue's 700 one-step epochs
            # on 5 validation items peaked at epoch 47
            judged = self.main and len(self.val_items) >= AUTO_MIN_VALIDATION
            why = memorising(history, self.cfg.epochs, self.cfg.select_by) if judged else None
            if not auto:
                if why is not None:
                    logger.warning("%s, as when a catalogue's wrong labels are being learnt; 'retrieval audit' ranks "
                                   "the suspect labels, and --early-learning %g (or auto) keeps training from "
                                   "learning them", why, EARLY_LEARNING)
            elif self.all_ranks_have(why is not None if self.main else True):
                history = self.train_again_with_early_learning(why)
        return history

    def train_epochs(self, fresh: bool = False) -> list[dict]:
        """The epochs from the start (``fresh``) or from where last.pt left off (``--resume``)."""
        cfg = self.cfg
        state = self.build_state()
        optimizer, scheduler = state.optimizer, state.scheduler
        first, history, best = (0, [], -float("inf")) if fresh else self.restore(optimizer, scheduler)
        if first >= cfg.epochs and self.main:
            logger.warning("%s has trained %d epochs already (--epochs %d): nothing to do; a larger --epochs "
                           "trains it further", self.out, first, cfg.epochs)
            return history
        if self.main:
            write_config(self.out / "config.yaml", cfg)
        for epoch in range(first, cfg.epochs):
            torch.manual_seed(cfg.seed * 1000 + epoch)
            record = {"epoch": epoch, **train_one_epoch(state, self.epoch_batches(epoch), self.targets, f"epoch {epoch}")}
            self.share_bad_rows()
            if self.main:
                record.update(validate(state, self.val_batches(), self.val_targets, self.val_items,
                                       self.catalog.groups, cooccurrence=self.cooccurrence))
                history.append(record)
                self.save_epoch(optimizer, scheduler, epoch, history, record, best)
                best = max(best, self.selection_score(record))
            if self.world > 1:
                dist.barrier()
        return history

    def use_early_learning(self) -> None:
        """Fresh weights (as a run started with ``--early-learning EARLY_LEARNING`` has) and the
        regularisation on; config.yaml and the checkpoints record the weight."""
        self.cfg = replace(self.cfg, early_learning=EARLY_LEARNING)
        torch.manual_seed(self.cfg.seed)
        self._prepare_model()
        self._prepare_loss()

    def hold_run_folder(self) -> None:
        """Lock RUN for this job's life (``RUN/.train.lock``, released when the process ends, even by
        kill -9): a second ``train`` into the same --out stops at once, naming the holder, instead of
        both writing best.pt and last.pt and one's epochs being lost."""
        held = hold_lock(self.out / ".train.lock")
        if isinstance(held, str):
            raise ValueError(f"{self.out} is in use by another training (pid {held}); wait for it to finish "
                             "or choose another --out")
        self._run_lock = held  # until release_run_folder, or the process's end

    def release_run_folder(self) -> None:
        """Let go of ``hold_run_folder``'s lock (the job is over; a later train in this process may take it)."""
        if self._run_lock is not None:
            os.close(self._run_lock)
            self._run_lock = None

    def check_resumable(self, ckpt: dict) -> None:
        """Refuse ``--resume`` of a last.pt this job cannot continue as it was trained, naming what
        differs: another model configuration (method, groups, labels, image size, ...), optimisation
        options the saved optimiser and schedule hold (``RESUME_FIXED``), or per-item state on training
        items that changed (``check_items_unchanged``)."""
        last = self.out / "last.pt"
        mine = self.model.config.to_dict()
        theirs = {**LEGACY, **ckpt["model_config"]}  # a run from before an option existed had its old value
        keys = sorted(k for k in {*mine, *theirs} if mine.get(k) != theirs.get(k))
        if keys:
            told = "; ".join(f"{k} {theirs.get(k)!r} there, {mine.get(k)!r} now" for k in keys)
            flags = [option_flag(k, theirs[k]) for k in keys if k not in ("groups", "multi_label_groups")]
            how = (f"resume it with the options it was trained with ({' '.join(flags)})" if len(flags) == len(keys)
                   else "the catalog's groups or labels changed since; it cannot be resumed")
            raise ValueError(f"{last}: was trained with another model configuration ({told}): {how}, or train "
                             "into a new --out")
        before = ckpt.get("train_config", {})
        changed = [f"{k} {before[k]!r} there, {getattr(self.cfg, k)!r} now" for k in RESUME_FIXED
                   if k in before and before[k] != getattr(self.cfg, k)]
        if changed:
            raise ValueError(f"{last}: --resume continues the run as it was trained ({'; '.join(changed)}): leave "
                             "those options as they were, or train into a new --out")
        self.check_items_unchanged(ckpt)

    def items_key(self) -> str:
        """A digest of the training and validation items' images in order: what per-item state in a
        checkpoint (filled labels, early learning's targets) is indexed by."""
        return items_digest(self.train_items)["paths"] + items_digest(self.val_items)["paths"][:16]

    def check_items_unchanged(self, ckpt: dict) -> None:
        """Refuse to resume a checkpoint holding per-item state (filled labels, early learning's targets,
        both kept by position among the training items) onto training items that changed since: rows
        added, removed or reordered would put each item's state on another image (or past the end)."""
        per_item = "filled_labels" in ckpt or ("early_learning" in ckpt and self.early_learning is not None)
        stored = ckpt.get("training_items")
        if per_item and stored is not None and stored != self.items_key():
            raise ValueError(f"{self.out / 'last.pt'}: the catalog's training or validation items changed since it was "
                             "written (rows added, removed or reordered); its filled labels and early-learning "
                             "targets are kept by position and would land on other images: train into a new --out")

    def _last_checkpoint(self) -> dict | None:
        """RUN/last.pt (None where there is none), read once: ``restore`` takes it from here rather
        than read it again (with early learning's targets, hundreds of MB on a full corpus)."""
        if self._last is None and (self.out / "last.pt").exists():
            self._last = load_checkpoint(self.out / "last.pt")
        return self._last

    def _second_run_started(self) -> bool:
        """Whether last.pt is from the second run of ``--early-learning auto`` (it records the weight)."""
        last = self._last_checkpoint()
        return last is not None and parse_early_learning(
            last["train_config"].get("early_learning", 0.0)) not in ("auto", 0.0)

    def train_again_with_early_learning(self, why: str | None) -> list[dict]:
        """The second run of ``--early-learning auto``, from the start; the first's best.pt and
        metrics.json are kept aside (``ASIDE``)."""
        if self.main:
            logger.warning("%s, as when a catalogue's wrong labels are being learnt; training again from the start "
                           "with --early-learning %g ('retrieval audit' ranks the suspect labels)", why, EARLY_LEARNING)
            self.set_aside(ASIDE)
        self.use_early_learning()
        history = self.train_epochs(fresh=True)
        self.keep_the_better_run(history)
        return history

    def set_aside(self, names: dict[str, str]) -> None:
        """Rename the finished run's best.pt and metrics.json (``names``) before the next run starts."""
        for name, aside in names.items():
            if (self.out / name).exists() or not (self.out / aside).exists():  # else done by a run stopped here
                os.replace(self.out / name, self.out / aside)

    def keep_the_better_run(self, history: list[dict], names: dict[str, str] = ASIDE,
                            change: str = "with early learning") -> None:
        """After a run that retrained with a ``change`` (the second run of ``--early-learning auto``,
        or ``--fill-missing``'s): best.pt is the run's before it (set aside as ``names``) again when
        that validated better (the new run's last.pt and metrics.json stay)."""
        aside = self.out / names["best.pt"]
        if not self.main or not aside.exists():
            return
        without = load_checkpoint(aside)["best_score"]
        score = max((self.selection_score(r) for r in history), default=-float("inf"))
        if score < without:
            logger.warning("%s the best validation score is %.4f against %.4f without: best.pt is the run without "
                           "again", change, score, without)
            with atomic_write(self.out / "best.pt", "wb") as f:
                f.write(aside.read_bytes())
        else:
            logger.info("%s the best validation score is %.4f against %.4f without (%s)", change, score, without,
                        aside.name)

    # ----- --fill-missing -----
    def softmax_groups(self) -> list[str]:
        """The groups trained with a softmax (those early learning holds and --fill-missing fills)."""
        if self.cfg.method == "multi-label":
            return []
        return [g for g in self.catalog.groups if self.kinds[g] == "ce"]

    def fill_confidence(self) -> float:
        """``--fill-missing``'s confidence for this run's training labels, 0 where it does not fill:
        off, no softmax group, or (auto) none lacking FILL_MIN_MISSING of the training items' labels."""
        confidence = parse_fill_missing(self.cfg.fill_missing)
        groups = self.softmax_groups()
        if confidence == "auto":
            n, counts = max(1, len(self.train_items)), self.targets.counts()
            lacking = [g for g in groups if 1 - counts[g] / n >= FILL_MIN_MISSING]
            confidence = FILL_MISSING if lacking else 0.0
            if lacking and len(self.val_items) < AUTO_MIN_VALIDATION:
                if self.main:
                    logger.info("--fill-missing auto: %d validation items are too few to choose between a run with "
                                "the missing labels filled and one without (%d needed); give a confidence "
                                "(--fill-missing 0.9) to fill anyway", len(self.val_items), AUTO_MIN_VALIDATION)
                confidence = 0.0
        if confidence and not groups and self.main and self.cfg.fill_missing != "auto":
            logger.warning("--fill-missing %s is off: it fills single-label (softmax) groups, and this run has none",
                           self.cfg.fill_missing)
        return confidence if groups else 0.0

    def _filled_run_started(self) -> bool:
        """Whether last.pt is from ``--fill-missing``'s run (it holds the filled labels)."""
        last = self._last_checkpoint()
        return last is not None and "filled_labels" in last

    def train_with_filled_labels(self, confidence: float = 0.0, resumed: bool = False) -> list[dict]:
        """``--fill-missing``'s run: from the start, as the run kept so far was trained (its early
        learning weight), with each missing training label of a softmax group that the kept run
        predicts at ``confidence`` or more filled in; or that run resumed from last.pt."""
        if resumed:
            ckpt = self._last_checkpoint()
            self.check_items_unchanged(ckpt)
            filled, before = ckpt["filled_labels"], ckpt["train_config"]
        else:
            if self.main:
                self.set_aside(FILL_ASIDE)
            if self.world > 1:
                dist.barrier()
            kept = load_checkpoint(self.out / FILL_ASIDE["best.pt"])
            self.model.load_state_dict(kept["model"])
            filled, before = self.predict_missing(confidence), kept["train_config"]
            if self.main:
                told = ", ".join(f"{g} {int((f >= 0).sum())} of {int((~self.targets.known[g]).sum())}"
                                 for g, f in filled.items() if not self.targets.known[g].all())
                logger.warning("training again from the start with the missing training labels the model predicts "
                               "at %.2f or more filled in (%s; the validation items' labels are not filled)",
                               confidence, told)
        weight = parse_early_learning(before.get("early_learning", 0.0))
        self.cfg = replace(self.cfg, early_learning=0.0 if weight == "auto" else weight,
                           fill_missing=before["fill_missing"] if resumed else confidence)
        self.fill_targets(filled)
        torch.manual_seed(self.cfg.seed)
        self._prepare_model()
        self._prepare_loss()
        history = self.train_epochs(fresh=not resumed)
        self.keep_the_better_run(history, FILL_ASIDE, "with the missing labels filled")
        return history

    def fill_targets(self, filled: dict[str, torch.Tensor]) -> None:
        """Write the filled labels (-1: none) into the training targets."""
        self.filled = filled
        for g, labels in filled.items():
            rows = torch.nonzero(labels >= 0).flatten()
            self.targets.multi_hot[g][rows, labels[rows]] = 1
            self.targets.known[g][rows] = True

    @torch.no_grad()
    def predict_missing(self, confidence: float) -> dict[str, torch.Tensor]:
        """Per softmax group, each training item's most probable label where its label is missing and
        the model (as it is now) gives it ``confidence`` or more, else -1; the main rank's, on every rank."""
        groups, n = self.softmax_groups(), len(self.train_items)
        filled = {g: torch.full((n,), -1, dtype=torch.long) for g in groups}
        fillable = {g: missing_at_random(self.targets, g) for g in groups}
        self.model.eval()
        forward = CachedForward(self.model, self.start) if self.mode == "cached" else self.model
        for positions, x in self.unaugmented_batches(self.train_items, self.train_rows):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                _, logits, _ = forward(*x) if isinstance(x, tuple) else forward(x)
            for g in groups:
                top, label = self.model.probabilities(g, logits[g].float()).cpu().max(1)
                fill = ~self.targets.known[g][positions] & fillable[g][positions] & (top >= confidence)
                filled[g][positions] = torch.where(fill, label, -1)
        if self.world > 1:  # the main rank's: another's numerics could land otherwise at the threshold
            for g in groups:
                mine = filled[g] + 1 if self.main else torch.zeros_like(filled[g])
                filled[g] = self.collectives.all_reduce(mine).cpu() - 1
        return filled

    def selection_score(self, record: dict) -> float:
        return selection_score(record, self.cfg.select_by)

    def save_epoch(self, optimizer, scheduler, epoch, history, record, best):
        """Log the epoch; write best.pt when validation improved, and with it, at the last epoch and
        otherwise every ``CHECKPOINT_EVERY_S``, last.pt and metrics.json. last.pt is never older than
        best.pt, so a resumed run replays the epochs after it and finds best.pt's score again; a kill
        between the two leaves last.pt at the best epoch, and the resume writes best.pt from it
        (``restore``)."""
        score = self.selection_score(record)
        improved = score > best
        if improved or epoch == self.cfg.epochs - 1 or time.monotonic() - self._saved_at >= CHECKPOINT_EVERY_S:
            ckpt = self.checkpoint(optimizer, scheduler, epoch, history, max(best, score))
            atomic_save(ckpt, self.out / "last.pt")
            if improved:
                atomic_save(self.best_of(ckpt), self.out / "best.pt")
            write_json(self.out / "metrics.json", history)
            self._saved_at = time.monotonic()
        accuracy = " ".join(f"{g}={a:.3f}" for g, a in record.get("val_accuracy", {}).items() if a is not None)
        logger.info("epoch %d: train loss %.4f, val loss %.4f, val mAP %.3f, %.0f img/s, %.1fs (%.1fs waiting for "
                    "batches, first step after %.1fs) | val acc %s", epoch, record["train_loss"],
                    record.get("val_loss", float("nan")), record.get("val_map", float("nan")), record["images_per_s"],
                    record["seconds"], record["waiting_s"], record["first_step_s"] or 0.0, accuracy)


def train(cfg: TrainConfig) -> list[dict]:
    """Run a training job from a config."""
    job = Job(cfg)
    try:
        return job.run()
    finally:
        job.release_run_folder()
        job.train_loader = job.val_loader = None  # their worker processes end here, not when the job is collected
        if job.world > 1 and dist.is_initialized():
            job.collectives.release()  # see Collectives: else a finished run may abort at exit
            dist.destroy_process_group()

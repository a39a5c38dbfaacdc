"""``retrieval train``: train a model on a catalog (``torchrun`` for several GPUs or processes)."""
from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, fields

from retrieval.commands.argtypes import at_least, image_size, number_above, share_below_one
from retrieval.devices import resolve_device
from retrieval.net.backbones import BACKBONES
from retrieval.net.colour import COLOUR_WEIGHTINGS
from retrieval.net.layers import SHARED_LAYERS
from retrieval.net.model import METHODS, POOL_WEIGHTINGS, SHARED_VIEWS
from retrieval.recipes import RECIPES, describe_recipe, load_recipe
from retrieval.train.config import (EARLY_LEARNING, OPTIMIZERS, SCHEDULES, SIGMOID_WEIGHT_UNDER_EARLY_LEARNING,
                                    TrainConfig, parse_early_learning, parse_fill_missing)
from retrieval.train.losses import GROUP_LOSSES, LOSS_NORMS, RANGE_DISTANCES, WEIGHTINGS
from retrieval.train.sampling import SAMPLINGS, parse_target


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Each option's default after its help, where it has one and the help does not already say it:
    argparse's own formatter printed "(default: None)" after "(default: all)", and nothing for the
    options without help text (--backbone, --lr, --seed)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default is None or default is argparse.SUPPRESS or "default" in text or not action.option_strings
                or action.nargs == 0):  # a switch (store_true / store_const / --x/--no-x) says it in its help
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retrieval train", formatter_class=DefaultsHelpFormatter, description=(
        "Train a shared trunk + shared embedding layer + one head per attribute group. On a CPU the "
        "default trains the embedding and heads on trunk features computed once and cached; on a GPU "
        "the whole network is fine-tuned. Launch with torchrun for several GPUs/processes."))
    p.add_argument("--recipe", choices=RECIPES,
                   help="a paper's setup as defaults (li2017: AlexNet fc6/fc7, sigmoid cross-entropy, SGD; "
                        "dress2019: ResNet101, step schedule, frozen BatchNorm); --config and flags override it")
    p.add_argument("--config", help="YAML file of defaults for any option below (over --recipe's)")
    data = p.add_argument_group("data")
    data.add_argument("--catalog", required=True, metavar="DIR", help="catalog directory (labels.csv + images)")
    data.add_argument("--out", required=True, metavar="RUN", help="run directory for checkpoints and metrics")
    data.add_argument("--label-dropout", metavar="PROFILE",
                      help="keep group t's training labels on a share of images: 'paper' or e.g. 1.0,0.9,0.6")
    data.add_argument("--groups", metavar="G1,G2", help="train on these attribute groups only (default: all)")
    data.add_argument("--val-fraction", type=share_below_one,
                      help="share of the train split held out for validation when the catalog has no val split")
    data.add_argument("--image-cache", metavar="H5", help="pre-decoded images from 'retrieval cache'")
    data.add_argument("--trunk-cache", metavar="H5", help="where to keep cached trunk outputs (default RUN/trunk-cache.h5); "
                                                         "share one file between runs of the same backbone")
    data.add_argument("--cache-memory", type=float, metavar="GB",
                      help="hold the trunk cache in memory up to this size, else read each batch's rows from "
                           "disk (default: half the machine's memory, shared by torchrun's local ranks; 0: disk)")
    data.add_argument("--workers", type=int, help="data loader processes (default: cores - 1)")
    model = p.add_argument_group("model")
    model.add_argument("--backbone", choices=BACKBONES, help="the trunk network")
    model.add_argument("--weights", help="local trunk weights file (efficientnet_lite0 has packaged ImageNet weights)")
    model.add_argument("--embed-dim", type=at_least(1), help="width of the shared embedding")
    model.add_argument("--embed-hidden", type=at_least(0), metavar="WIDTH",
                       help="a hidden layer of this width in the embedding layer (0 = one linear layer; default "
                            "1024); fc6's width with --shared-layers fc")
    model.add_argument("--shared-layers", choices=SHARED_LAYERS,
                       help="embedding: BatchNorm, Dropout, hidden layer, Linear; fc: AlexNet-style fc6/fc7 "
                            "(Dropout, Linear, ReLU twice), fc7's output indexed")
    model.add_argument("--shared-view", choices=SHARED_VIEWS,
                       help="what the shared view (the index searched for similar items) ranks by: matches = "
                            "a quarter of the shared embedding's cosine plus the groups' mean chance of a shared "
                            "label (a plain inner product of the embedding and every group's probabilities); "
                            "with-groups = the same parts as one L2-normalised vector (a cosine: each multi-label "
                            "group's probabilities unit length); embedding = the shared embedding alone (the "
                            "papers' retrieval features; 'retrieval evaluate --shared-view embedding' measures it "
                            "from the same file). 'retrieval embed --shared-view' changes it without training")
    model.add_argument("--taps", help="trunk units pooled into the embedding: all, last, or e.g. 2,3,4 (numbers "
                                      "from 0, -1 the last; efficientnet_lite has 9 units, the ResNets 5, "
                                      "alexnet 3, tiny 4)")
    model.add_argument("--gem-p", type=number_above(0), help="GeM pooling exponent (1 = average pooling)")
    model.add_argument("--pool-weighting", choices=POOL_WEIGHTINGS,
                       help="auto: with --colour-weighting learned, learned when the trunk trains and map when "
                            "it is frozen, else none; "
                            "foreground: weight pooling towards pixels unlike the image border (the product); "
                            "learned: pool the last unit with the learned colour weighting's attention "
                            "(where the network finds the garment; needs --colour-weighting learned); map: pool "
                            "the unit before the last, whose map the attention reads, with it (free from a trunk cache)")
    model.add_argument("--colour-bins", metavar="L,A,B",
                       help="add a CIELAB colour histogram of the product with this many bins along L, a "
                            "and b to the pooled features (none = off)")
    model.add_argument("--colour-weighting", choices=COLOUR_WEIGHTINGS,
                       help="which pixels the histogram counts: border = unlike the image border; attention = "
                            "those, weighted by where the trunk's last unit responds (finds the garment in clutter); "
                            "learned = a histogram per cell of the trunk's map, pooled by an attention that starts "
                            "as the attention weighting and trains with the heads")
    model.add_argument("--dropout", type=share_below_one, help="dropout on the pooled features")
    model.add_argument("--head-scale", type=number_above(0),
                       help="scale of the cosine heads' logits (the inverse softmax temperature)")
    model.add_argument("--normalized-heads", action=argparse.BooleanOptionalAction,
                       help="unit-length label weights in the per-group heads: a pure cosine classifier "
                            "(the multi-label method keeps a plain sigmoid layer)")
    model.add_argument("--label-attention", action=argparse.BooleanOptionalAction,
                       help="score each multi-label group's labels from the trunk's cells, each label attending "
                            "to where it shows (class-specific residual attention; needs --colour-weighting "
                            "learned); the heads still shape the embedding")
    model.add_argument("--flip-average", action=argparse.BooleanOptionalAction,
                       help="embed and predict from the mean of an image's and its mirror image's features")
    model.add_argument("--image-size", type=image_size,
                       help="input side in pixels (images are letterboxed to a square of this side)")
    model.add_argument("--trainable-blocks",
                       help="trunk units to train from the top: N, all, or auto (0 on CPU; on GPU all from "
                            "3,000 training items, 0 below)")
    model.add_argument("--freeze-trunk", action="store_const", const="0", dest="trainable_blocks",
                       help="same as --trainable-blocks 0")
    model.add_argument("--input", choices=("auto", "cached", "images"),
                       help="cached trunk outputs (with flips) or decoded images (full augmentation)")
    loss = p.add_argument_group("loss")
    loss.add_argument("--method", choices=METHODS,
                      help="multi-weight: a head per group, losses weighted by the groups' smoothed shares; "
                           "multi-task: the same, equal weights; multi-label: one sigmoid head over all labels")
    loss.add_argument("--weighting", choices=WEIGHTINGS,
                      help="group: smoothed group weights (multi-weight); label: also per label in each group")
    loss.add_argument("--smoothing-c", type=number_above(0), help="c in the weight floor mean(r)/c")
    loss.add_argument("--group-loss", choices=GROUP_LOSSES,
                      help="auto: softmax CE for single-label groups, sigmoid BCE for multi-label ones")
    loss.add_argument("--loss-norm", choices=LOSS_NORMS,
                      help="auto: balanced, or labelled with --method multi-label; "
                           "labelled: a group's loss is the mean over its labelled items (and sigmoid labels); "
                           "item: the same, summed over a sigmoid group's labels; balanced: a sigmoid item's mean "
                           "over its positive labels plus the mean over its negative ones; batch: summed over the group's labels, averaged over the batch (Li et al. Eq. 1; "
                           "with --method multi-label one sigmoid cross-entropy over all labels)")
    loss.add_argument("--head-fit", type=float, metavar="WEIGHT",
                      help="weight of a second loss on the sigmoid (multi-label) groups' heads, on the embedding "
                           "held fixed: every label's own cross-entropy (--loss-norm item), which makes each "
                           "label's probability decisive for the group view without letting the many negative "
                           "labels shape the shared embedding (0 = off; not for --method multi-label)")
    loss.add_argument("--early-learning", metavar="auto|WEIGHT",
                      help="weight of the early-learning regularisation of the softmax groups (ELR, Liu et "
                           "al. 2020): each training item's prediction is held near the running average of "
                           "its own earlier ones, so wrong labels are not memorised, and the sigmoid groups' "
                           f"weights are multiplied by {SIGMOID_WEIGHT_UNDER_EARLY_LEARNING:g} to keep their share "
                           "(0 = off); auto: off, and "
                           "if the finished run's best epoch, or its lowest validation loss before a 5%% rise, "
                           "falls in its first quarter (wrong labels being learnt), trained again from the start "
                           f"at {EARLY_LEARNING:g}, keeping whichever validates better")
    loss.add_argument("--early-learning-momentum", type=share_below_one, metavar="BETA",
                      help="momentum of those running averages, in [0, 1)")
    loss.add_argument("--early-learning-balance", type=float, metavar="TAU",
                      help="the predictions that make a softmax group's early-learning targets are divided by "
                           "each class's share of the training labels to the power TAU (shares below uniform "
                           "count as uniform) and renormalised, so an imbalanced group's targets do not "
                           "collapse onto its largest class (0 = off)")
    loss.add_argument("--early-learning-sigmoid", action=argparse.BooleanOptionalAction,
                      help="early learning holds the multi-label (sigmoid) groups' heads and their label attention "
                           "too, label by label (the default; --no-early-learning-sigmoid: the softmax groups only)")
    loss.add_argument("--fill-missing", metavar="auto|P",
                      help="where training labels are missing, train again from the start with each missing "
                           "label of a softmax group filled by the trained model's prediction when its "
                           "probability is P or more, keeping whichever run validates better (the validation "
                           "items' labels are never filled; 0 = off); auto: P = 0.9 when a softmax group lacks "
                           "the labels of 5%% or more of the training items")
    loss.add_argument("--label-smoothing", type=share_below_one, metavar="EPS",
                      help="share of each softmax target spread evenly over the group's labels")
    loss.add_argument("--metric-scale", type=float, metavar="S",
                      help="add the per-group heads' loss at logit scale S (below --head-scale): a "
                           "softer classifier that keeps pulling each item towards its labels, which "
                           "tightens the shared embedding (0 = off)")
    loss.add_argument("--sampling", choices=SAMPLINGS, help="random over/under-sampling per epoch")
    loss.add_argument("--sampling-group", help="the group whose classes --sampling balances")
    loss.add_argument("--sampling-target", metavar="min|median|max|N",
                      help="class size --sampling balances to (default: max for over, median for under)")
    loss.add_argument("--contrastive", type=float, metavar="WEIGHT",
                      help="weight of a contrastive loss pulling the shared embedding towards label "
                           "agreement over all groups (0 = off)")
    loss.add_argument("--range-loss", type=number_above(0, inclusive=True), metavar="WEIGHT", help="Range loss weight (0 = off)")
    loss.add_argument("--range-group", help="the group whose classes Range loss uses")
    loss.add_argument("--range-distance", choices=RANGE_DISTANCES, help="Range loss on L2 or squared L2 distances")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=at_least(1),
                     help="passes over the training items (default: 30, or more on a small catalogue, enough "
                          "for --min-steps optimisation steps)")
    opt.add_argument("--min-steps", type=at_least(1), metavar="N",
                     help="without --epochs, train at least N optimisation steps (batches)")
    opt.add_argument("--batch-size", type=at_least(2), help="images a step (a batch of one is skipped: batch norm)")
    opt.add_argument("--lr", type=number_above(0), help="learning rate")
    opt.add_argument("--trunk-lr-scale", type=number_above(0), help="learning rate factor of trainable trunk units")
    opt.add_argument("--weight-decay", type=number_above(0, inclusive=True), help="weight decay")
    opt.add_argument("--optimizer", choices=OPTIMIZERS, help="the optimiser")
    opt.add_argument("--momentum", type=float, help="SGD momentum")
    opt.add_argument("--schedule", choices=SCHEDULES,
                     help="cosine: warm-up then cosine decay; step: x --lr-gamma at each epoch in --lr-steps")
    opt.add_argument("--lr-steps", metavar="E1,E2", help="epochs where the step schedule lowers the learning rate")
    opt.add_argument("--lr-gamma", type=float, help="the step schedule's factor")
    opt.add_argument("--freeze-bn", action=argparse.BooleanOptionalAction,
                     help="keep every BatchNorm of the trunk frozen (statistics and affine parameters)")
    opt.add_argument("--select-by", choices=("map", "loss"),
                     help="best.pt is the epoch with the highest validation mAP (shared and group view "
                          "among the validation items) or the lowest validation loss")
    opt.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    opt.add_argument("--seed", type=int, help="seed of the weights' initialisation, the validation draw and the batches")
    opt.add_argument("--resume", action="store_true", help="continue RUN/last.pt")
    p.set_defaults(**{f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING})
    return p


def config_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    """The options of a ``--config`` YAML file, each checked as its flag is: a name no option has (a
    typo) is an error naming the close ones, dashes read as underscores, a value converted by the
    option's type and checked against its choices, a switch given true or false."""
    import difflib

    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as err:
        parser.error(f"--config {path}: {err}")
    except UnicodeDecodeError as err:  # a checkpoint given for its config.yaml: the codec's words alone named no file
        parser.error(f"--config {path}: not a YAML text file (byte {err.start} is not UTF-8: a checkpoint or "
                     "other binary file?); give a YAML file of option: value lines, such as a run's config.yaml")
    if not isinstance(loaded, dict):
        parser.error(f"--config {path}: holds a {type(loaded).__name__}, not option: value lines")
    actions = {}
    for a in parser._actions:  # of several flags for one option (--freeze-trunk), the one taking a value
        if a.dest not in ("help", "config") and (a.dest not in actions or actions[a.dest].nargs == 0):
            actions[a.dest] = a
    out = {}
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
        action = actions.get(name)
        if action is None:
            close = difflib.get_close_matches(name, actions, n=3)
            parser.error(f"--config {path}: no option {key!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
        if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):  # a switch
            if not isinstance(value, bool):
                parser.error(f"--config {path}: {key} takes true or false, not {value!r}")
        elif value is not None:
            if isinstance(value, (list, dict)):
                parser.error(f"--config {path}: {key} takes one value, not {value!r}")
            try:  # as the flag's text would be
                value = action.type(str(value)) if action.type else str(value)
            except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
                parser.error(f"--config {path}: {key}: {str(err) or repr(value)}")
            if action.choices is not None and value not in action.choices:
                parser.error(f"--config {path}: {key} {value!r} is not one of: {', '.join(map(str, action.choices))}")
        out[name] = value
    return out


def parse_config(argv=None) -> TrainConfig:
    """Arguments (with YAML defaults from --config) as a TrainConfig."""
    parser = get_args_parser()
    # --recipe and --config first: they give defaults (--catalog and --out too, from a file)
    pre = argparse.ArgumentParser(prog="retrieval train", add_help=False)
    pre.add_argument("--recipe")
    pre.add_argument("--config")
    first, _ = pre.parse_known_args(argv)
    if first.recipe:
        parser.set_defaults(**load_recipe(first.recipe)["options"])
    if first.config:
        given = config_defaults(parser, first.config)
        parser.set_defaults(**given)
        for action in parser._actions:  # --catalog / --out given by the file are given
            if action.dest in given and given[action.dest] is not None:
                action.required = False
    args = vars(parser.parse_args(argv))
    names = {f.name for f in fields(TrainConfig)}
    if (args.get("sampling") != "none") and not args.get("sampling_group"):
        parser.error("--sampling needs --sampling-group")
    if args.get("range_loss") and not args.get("range_group"):
        parser.error("--range-loss needs --range-group")
    if args.get("cache_memory") is not None and not args["cache_memory"] >= 0:
        parser.error(f"--cache-memory must be a size in GB, 0 or more; got {args['cache_memory']}")
    if args.get("sampling_target"):
        try:
            parse_target(args["sampling_target"])
        except ValueError as e:
            parser.error(str(e))
    try:
        args["early_learning"] = parse_early_learning(args["early_learning"])
        args["fill_missing"] = parse_fill_missing(args["fill_missing"])
    except ValueError as e:
        parser.error(str(e))
    return TrainConfig(**{k: v for k, v in args.items() if k in names})


def main(argv=None) -> int:
    from retrieval.train.trainer import train

    cfg = parse_config(argv)
    if cfg.recipe and os.environ.get("RANK", "0") == "0":
        print(describe_recipe(cfg, resolve_device(cfg.device)), flush=True)
    train(cfg)
    return 0

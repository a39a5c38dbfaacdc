"""Training through the real CLI: one-epoch smoke, resume, torchrun (gloo), corrupt images, predict."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY
from retrieval.net.checkpoint import load_checkpoint, load_model
from retrieval.train.loop import selection_score
from retrieval.cli import main as cli
from retrieval.data.catalog import read_catalog
from retrieval.net.model import fingerprint
from retrieval.train.losses import attention_key
from retrieval.train.config import EARLY_LEARNING


def train(catalog, out, *extra):
    return cli(["train", "--catalog", str(catalog), "--out", str(out), *TINY, *extra])


def torchrun_train(catalog, out, *extra, timeout=300):
    """``retrieval train`` in two torchrun processes (gloo, one thread each); asserts it succeeded."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "retrieval.cli", "train", "--catalog", str(catalog), "--out", str(out), *TINY, *extra]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture
def auto_on_few_items(monkeypatch):
    """auto's second runs on the demo catalog's few validation items (AUTO_MIN_VALIDATION: 20)."""
    import retrieval.train.trainer as trainer

    monkeypatch.setattr(trainer, "AUTO_MIN_VALIDATION", 0)


def test_smoke_run_writes_checkpoints_config_and_metrics(tiny_run, demo_catalog, capsys):
    for name in ("best.pt", "last.pt", "config.yaml", "metrics.json", "trunk-cache.h5"):
        assert (tiny_run / name).exists(), name
    ckpt = load_checkpoint(tiny_run / "last.pt")
    assert ckpt["epoch"] == 1 and "optimizer" in ckpt
    assert set(ckpt["model_config"]["groups"]) == {"category", "colours", "pattern", "sleeve", "gender"}
    assert ckpt["model_config"]["multi_label_groups"] == ["colours"]
    # Li et al. by hand: r = labelled training items of a group / the largest group's; every r here is
    # above mean(r)/3, so the weight is r itself (sleeve is unknown for sleeveless garments: r < 1)
    from retrieval.data.catalog import read_catalog
    from retrieval.train.config import split_validation

    train = split_validation(read_catalog(demo_catalog).split_items("train"), 0.1)[0]
    counts = {g: sum(1 for it in train if it.labels[g]) for g in ckpt["group_weights"]}
    top = max(counts.values())
    assert all(n / top >= sum(counts.values()) / len(counts) / top / 3 for n in counts.values())
    assert ckpt["group_weights"] == pytest.approx({g: n / top for g, n in counts.items()})
    assert ckpt["group_weights"]["sleeve"] < 0.8
    model, _ = load_model(tiny_run / "last.pt")
    assert fingerprint(model) == ckpt["fingerprint"]
    history = json.loads((tiny_run / "metrics.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1]
    assert set(history[-1]["val_accuracy"]) == set(ckpt["model_config"]["groups"])
    config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert config["method"] == "multi-weight" and config["backbone"] == "tiny"


@pytest.mark.parametrize("method", ["multi-task", "multi-label"])
def test_other_methods_train(demo_catalog, tmp_path, method, capsys):
    assert train(demo_catalog, tmp_path / method, "--epochs", "1", "--method", method,
                 "--trunk-cache", str(tmp_path / "trunk.h5")) == 0
    out = capsys.readouterr().out
    assert f"method {method}" in out and "weight" in out
    assert load_checkpoint(tmp_path / method / "last.pt")["model_config"]["method"] == method


def test_a_group_the_photos_do_not_show_is_named(demo_catalog, tiny_run, tmp_path, monkeypatch, caplog):
    # the run's history and targets go to unlearnt_groups (tested in test_loop.py) once the run is
    # over; each group it returns is named with its accuracy, baseline and largest class
    import retrieval.train.trainer as trainer

    seen = []
    def unlearnt(history, train_targets, val_targets, select_by):
        seen.append((len(history), sorted(train_targets.known), len(val_targets.known["category"]), select_by))
        return {"pattern": (0.5, 0.6, 1)}
    monkeypatch.setattr(trainer, "unlearnt_groups", unlearnt)
    shutil.copy(tiny_run / "trunk-cache.h5", tmp_path / "trunk.h5")
    assert train(demo_catalog, tmp_path / "run", "--epochs", "2", "--trunk-cache", str(tmp_path / "trunk.h5")) == 0
    from retrieval.train.config import split_validation

    catalog = read_catalog(demo_catalog)
    vocab, validation = catalog.vocab["pattern"], split_validation(catalog.split_items("train"), 0.1)[1]
    assert seen == [(2, ["category", "colours", "gender", "pattern", "sleeve"], len(validation), "map")]
    assert (f"group 'pattern': validation accuracy 0.500 at the best epoch, no better than always answering its "
            f"largest training class {vocab[1]!r} (0.600): the photos may not show it") in caplog.text


def test_resume_continues_exactly(demo_catalog, tiny_run, tmp_path):
    # one epoch, then --resume to two: the same weights as the uninterrupted two-epoch run
    run = tmp_path / "resumed"
    shutil.copy(tiny_run / "trunk-cache.h5", tmp_path / "trunk.h5")
    assert train(demo_catalog, run, "--epochs", "1", "--trunk-cache", str(tmp_path / "trunk.h5")) == 0
    assert load_checkpoint(run / "last.pt")["epoch"] == 0
    assert train(demo_catalog, run, "--epochs", "2", "--resume", "--trunk-cache", str(tmp_path / "trunk.h5")) == 0
    resumed, straight = load_checkpoint(run / "last.pt"), load_checkpoint(tiny_run / "last.pt")
    assert resumed["epoch"] == 1
    for key, value in straight["model"].items():
        assert torch.allclose(resumed["model"][key].float(), value.float(), atol=1e-6), key
    # best.pt deleted: the resumed run writes one (it finished without one): from last.pt when that is the
    # best epoch so far, else at its next epoch
    (run / "best.pt").unlink()
    assert train(demo_catalog, run, "--epochs", "3", "--resume", "--trunk-cache", str(tmp_path / "trunk.h5")) == 0
    history = load_checkpoint(run / "last.pt")["history"]
    scores = [selection_score(r, "map") for r in history]
    last_was_best = scores[:2].index(max(scores[:2])) == 1
    assert load_checkpoint(run / "best.pt")["epoch"] == (scores.index(max(scores)) if last_was_best else 2)


def test_a_kill_between_the_two_checkpoints_keeps_the_best_epoch(demo_catalog, tiny_run, tmp_path, monkeypatch):
    # a kill after last.pt of the best epoch, before its best.pt: the resume found no better epoch and
    # best.pt kept an earlier one ("the best epoch before is not kept"); it is now written from last.pt
    import retrieval.train.trainer as trainer

    shutil.copy(tiny_run / "trunk-cache.h5", tmp_path / "trunk.h5")
    real, run = trainer.atomic_save, tmp_path / "run"

    def killed_before_epoch_1s_best_pt(ckpt, path):
        if Path(path).name == "best.pt" and ckpt["epoch"] == 1:
            raise KeyboardInterrupt  # the kill
        real(ckpt, path)

    monkeypatch.setattr(trainer, "atomic_save", killed_before_epoch_1s_best_pt)
    with pytest.raises(KeyboardInterrupt):
        train(demo_catalog, run, "--epochs", "2", "--trunk-cache", str(tmp_path / "trunk.h5"))
    monkeypatch.undo()
    straight = load_checkpoint(tiny_run / "best.pt")
    assert straight["epoch"] == 1  # the case: the last epoch is the best
    assert load_checkpoint(run / "last.pt")["epoch"] == 1 and load_checkpoint(run / "best.pt")["epoch"] == 0
    assert train(demo_catalog, run, "--epochs", "2", "--resume", "--trunk-cache", str(tmp_path / "trunk.h5")) == 0
    resumed = load_checkpoint(run / "best.pt")
    assert resumed["epoch"] == 1 and "optimizer" not in resumed
    for key, value in straight["model"].items():
        assert torch.allclose(resumed["model"][key].float(), value.float(), atol=1e-6), key


def test_a_resume_keeps_a_better_best_pt_of_another_epoch(demo_catalog, tiny_run, tmp_path):
    # --early-learning auto / --fill-missing keep the better run's best.pt, of another epoch than the
    # last run's last.pt: a resume took the epoch numbers' difference for a lost best.pt and wrote over it
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    kept = load_checkpoint(run / "best.pt")
    kept.update(epoch=0, best_score=1e9)  # the run before's, better than anything in last.pt's history
    torch.save(kept, run / "best.pt")
    before = (run / "best.pt").read_bytes()
    assert train(demo_catalog, run, "--epochs", "2", "--resume") == 0  # nothing to do
    assert (run / "best.pt").read_bytes() == before


def test_resume_names_what_it_cannot_continue_before_the_trunk_pass(demo_catalog, tiny_run, tmp_path, capsys,
                                                                    monkeypatch, caplog):
    # another model configuration (named now), optimiser options the saved state holds (--lr was
    # ignored, --optimizer sgd a KeyError), and fewer epochs than trained (config.yaml was rewritten)
    import retrieval.train.trainer as trainer

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = (run / "config.yaml").read_text()
    monkeypatch.setattr(trainer.Job, "prepare_inputs", lambda job: pytest.fail("the trunk pass ran"))
    for extra, message in ((("--image-size", "96"), "another model configuration (image_size 64 there, 96 now): resume "
                                                    "it with the options it was trained with (--image-size 64)"),
                           (("--lr", "0.5"), "(lr 0.002 there, 0.5 now)"),
                           (("--optimizer", "sgd"), "optimizer 'adamw' there, 'sgd' now"),
                           (("--select-by", "loss"), "select_by 'map' there, 'loss' now")):  # best.pt's scores
        assert train(demo_catalog, run, "--epochs", "3", "--resume", *extra) == 1
        assert message in capsys.readouterr().err, extra
    monkeypatch.undo()
    assert train(demo_catalog, run, "--epochs", "1", "--resume") == 0
    assert "has trained 2 epochs already (--epochs 1): nothing to do" in caplog.text
    assert (run / "config.yaml").read_text() == before


def test_a_run_from_before_an_option_existed_resumes_with_its_old_value(demo_catalog, tmp_path, capsys):
    # a last.pt written before --shared-view and --label-attention existed lacks both fields: it was
    # trained with their old values (LEGACY), so the options that say so resume it; before, a missing
    # field never equalled anything and every resume was refused, naming options nobody had changed
    run = tmp_path / "run"
    old = ("--shared-view", "embedding", "--no-label-attention")
    assert train(demo_catalog, run, "--epochs", "1", *old) == 0
    for name in ("last.pt", "best.pt"):
        ckpt = load_checkpoint(run / name)
        for key in ("shared_view", "label_attention"):
            del ckpt["model_config"][key]
        torch.save(ckpt, run / name)
    assert train(demo_catalog, run, "--epochs", "2", "--resume") == 1
    assert ("(label_attention False there, True now; shared_view 'embedding' there, 'matches' now): resume it with "
            "the options it was trained with (--no-label-attention --shared-view embedding)") in capsys.readouterr().err
    assert train(demo_catalog, run, "--epochs", "2", "--resume", *old) == 0
    assert load_checkpoint(run / "last.pt")["epoch"] == 1


def test_last_pt_follows_best_pt_and_a_stopped_run_resumes_from_the_last_one_written(demo_catalog, tiny_run,
                                                                                        tmp_path, monkeypatch):
    # epochs quicker than CHECKPOINT_EVERY_S: last.pt and metrics.json are written with best.pt and
    # at the last epoch only; a run stopped after unwritten epochs resumes from the last written one,
    # replays the rest and ends as the run made straight through, best.pt included
    import retrieval.train.trainer as trainer

    scores = [0.1, 0.3, 0.2, 0.2, 0.4, 0.1]  # validation by epoch: best.pt at epochs 0, 1 and 4
    monkeypatch.setattr(trainer, "CHECKPOINT_EVERY_S", 1e9)
    monkeypatch.setattr(trainer.Job, "selection_score", lambda job, record: scores[record["epoch"]])
    writes, atomic_save = [], trainer.atomic_save
    def counted(obj, path):
        writes.append((Path(path).name, obj["epoch"]))
        atomic_save(obj, path)
    monkeypatch.setattr(trainer, "atomic_save", counted)
    shutil.copy(tiny_run / "trunk-cache.h5", tmp_path / "trunk.h5")
    args = ["--epochs", "6", "--early-learning", "0", "--trunk-cache", str(tmp_path / "trunk.h5")]
    assert train(demo_catalog, tmp_path / "straight", *args) == 0
    assert [e for name, e in writes if name == "best.pt"] == [0, 1, 4]
    assert [e for name, e in writes if name == "last.pt"] == [0, 1, 4, 5]
    assert len(json.loads((tmp_path / "straight" / "metrics.json").read_text())) == 6

    save_epoch, run = trainer.Job.save_epoch, tmp_path / "stopped"
    def save_then_stop(job, optimizer, scheduler, epoch, *rest):
        save_epoch(job, optimizer, scheduler, epoch, *rest)
        if epoch == 3:
            raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(trainer.Job, "save_epoch", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            train(demo_catalog, run, *args)
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    assert len(json.loads((run / "metrics.json").read_text())) == 2
    assert train(demo_catalog, run, *args, "--resume") == 0
    for name in ("last.pt", "best.pt"):
        straight, resumed = load_checkpoint(tmp_path / "straight" / name), load_checkpoint(run / name)
        assert resumed["epoch"] == straight["epoch"] == {"last.pt": 5, "best.pt": 4}[name]
        assert resumed["fingerprint"] == straight["fingerprint"], name


def test_early_learning_resumes_exactly_and_keeps_its_targets_in_last_pt(demo_catalog, tiny_run, tmp_path, caplog):
    # --early-learning keeps a running target per training item and softmax group; they travel in
    # last.pt, so one epoch and a --resume to two give the weights of two epochs straight; best.pt
    # (what embed and the web UI load) does not carry them
    shutil.copy(tiny_run / "trunk-cache.h5", tmp_path / "trunk.h5")
    cache = ["--trunk-cache", str(tmp_path / "trunk.h5"), "--early-learning", "4"]
    assert train(demo_catalog, tmp_path / "straight", "--epochs", "2", *cache) == 0
    assert train(demo_catalog, tmp_path / "resumed", "--epochs", "1", *cache) == 0
    assert train(demo_catalog, tmp_path / "resumed", "--epochs", "2", "--resume", *cache) == 0
    straight, resumed = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "resumed" / "last.pt")
    for key, value in straight["model"].items():
        assert torch.allclose(resumed["model"][key].float(), value.float(), atol=1e-6), key
    catalog = read_catalog(demo_catalog)
    softmax = [g for g in catalog.groups if g not in catalog.multi_label_groups()]
    # every group held, the multi-label one (colours) label by label, on its head and on its label attention
    held = {**{g: g for g in catalog.groups}, attention_key("colours"): "colours"}
    assert softmax and sorted(straight["early_learning"]) == sorted(held)
    for key, g in held.items():
        targets = straight["early_learning"][key]
        assert torch.equal(targets, resumed["early_learning"][key])
        assert targets.shape[1] == len(catalog.vocab[g]) and targets.max() <= 1 + 1e-5
        if g in softmax:
            assert targets.sum(1).max() <= 1 + 1e-5
            assert (targets.sum(1) > 0.5).float().mean() > 0.5  # two epochs at momentum 0.7: 1 - 0.3^2 for items seen twice
    assert "early_learning" not in load_checkpoint(tmp_path / "straight" / "best.pt")
    # the sigmoid groups keep a share of the loss: weight x 2.5 whatever the early-learning weight
    plain = load_checkpoint(tiny_run / "last.pt")["group_weights"]
    assert straight["group_weights"] == pytest.approx({g: w * (2.5 if g == "colours" else 1) for g, w in plain.items()})
    assert "early_learning" not in load_checkpoint(tiny_run / "last.pt")  # off by default
    # a run made without them resumes with the targets starting from zero, and says so
    shutil.copytree(tiny_run, tmp_path / "plain", ignore=shutil.ignore_patterns("trunk-cache.h5"))
    assert train(demo_catalog, tmp_path / "plain", "--epochs", "3", "--resume", *cache) == 0
    assert "holds no early-learning targets" in caplog.text
    # --no-early-learning-sigmoid: the softmax groups only (as before)
    assert train(demo_catalog, tmp_path / "softmax", "--epochs", "1", *cache, "--no-early-learning-sigmoid") == 0
    assert sorted(load_checkpoint(tmp_path / "softmax" / "last.pt")["early_learning"]) == sorted(softmax)


def test_auto_early_learning_trains_again_when_validation_peaks_early(auto_on_few_items, demo_catalog, tiny_run,
                                                                      tmp_path, monkeypatch, caplog):
    # a peak in the first quarter (here forced: two epochs are too few for the rule) makes the default
    # train again from the start with early learning; the first run's best.pt and metrics.json stay
    # beside it, and best.pt is whichever validated better
    import retrieval.train.trainer as trainer

    peaks = []
    monkeypatch.setattr(trainer, "memorising", lambda history, *a: peaks.append(len(history)) or "forced")
    shutil.copy(tiny_run / "trunk-cache.h5", tmp_path / "trunk.h5")
    run, cache = tmp_path / "auto", ["--trunk-cache", str(tmp_path / "trunk.h5")]
    assert train(demo_catalog, run, "--epochs", "2", *cache) == 0
    assert peaks == [2] and "forced, as when a catalogue's wrong labels are being learnt; training again from " \
        f"the start with --early-learning {EARLY_LEARNING:g}" in caplog.text
    first = load_checkpoint(run / "best-without-early-learning.pt")
    assert first["train_config"]["early_learning"] == "auto" and "early_learning" not in first
    last, best = load_checkpoint(run / "last.pt"), load_checkpoint(run / "best.pt")
    assert last["train_config"]["early_learning"] == EARLY_LEARNING and "early_learning" in last
    second = max(r["val_map"] for r in json.loads((run / "metrics.json").read_text()))
    assert len(json.loads((run / "metrics-without-early-learning.json").read_text())) == 2
    assert best["best_score"] == pytest.approx(max(first["best_score"], second))
    assert yaml.safe_load((run / "config.yaml").read_text())["early_learning"] == EARLY_LEARNING
    # resumed after it finished: the second run is recognised (no third), nothing changes, and last.pt
    # is read once (it holds early learning's targets: hundreds of MB on a full corpus)
    caplog.clear()
    reads = []
    monkeypatch.setattr(trainer, "load_checkpoint", lambda path, *a, **k: reads.append(Path(path).name)
                        or load_checkpoint(path, *a, **k))
    assert train(demo_catalog, run, "--epochs", "2", "--resume", *cache) == 0
    assert peaks == [2] and "training again" not in caplog.text
    assert reads.count("last.pt") == 1
    assert load_checkpoint(run / "best.pt")["fingerprint"] == best["fingerprint"]
    # --early-learning 0: no second run, only the hint
    caplog.clear()
    assert train(demo_catalog, tmp_path / "off", "--epochs", "2", "--early-learning", "0", *cache) == 0
    assert "training again" not in caplog.text and "or auto) keeps training from learning them" in caplog.text
    assert not (tmp_path / "off" / "best-without-early-learning.pt").exists()


def test_auto_early_learning_resumes_when_stopped_between_the_runs(auto_on_few_items, demo_catalog, tiny_run, tmp_path,
                                                                   monkeypatch):
    # stopped after the first run's best.pt and metrics.json were set aside but before the second
    # run saved an epoch (last.pt is still the first run's): --resume starts the second run
    import retrieval.train.trainer as trainer

    monkeypatch.setattr(trainer, "memorising", lambda *a: "forced")
    def stop(job):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(trainer.Job, "use_early_learning", stop)
        shutil.copy(tiny_run / "trunk-cache.h5", tmp_path / "trunk.h5")
        run, cache = tmp_path / "auto", ["--trunk-cache", str(tmp_path / "trunk.h5")]
        with pytest.raises(KeyboardInterrupt):
            train(demo_catalog, run, "--epochs", "2", *cache)
    assert not (run / "best.pt").exists() and (run / "best-without-early-learning.pt").exists()
    assert train(demo_catalog, run, "--epochs", "2", "--resume", *cache) == 0
    assert load_checkpoint(run / "last.pt")["train_config"]["early_learning"] == EARLY_LEARNING
    assert (run / "best.pt").exists() and len(json.loads((run / "metrics.json").read_text())) == 2
    assert len(json.loads((run / "metrics-without-early-learning.json").read_text())) == 2


def fill_run(demo_catalog, tiny_run, tmp_path, name, *extra):
    shutil.copy(tiny_run / "trunk-cache.h5", tmp_path / f"{name}.h5")
    return train(demo_catalog, tmp_path / name, "--epochs", "2", "--trunk-cache", str(tmp_path / f"{name}.h5"),
                 "--fill-missing", "auto", *extra)


def test_fill_missing_trains_again_with_the_confident_labels_filled(auto_on_few_items, demo_catalog, tiny_run, tmp_path,
                                                                    caplog):
    # auto on the demo catalog (its groups lack 5% or more of the labels): a second run from the start
    # with the missing training labels that the first run predicts at 0.9 or more filled in; never a
    # label the item has, a sleeve length for trousers (none of them has one) or a validation item's
    from retrieval.train.config import split_validation

    assert fill_run(demo_catalog, tiny_run, tmp_path, "fill") == 0
    run = tmp_path / "fill"
    assert "the missing training labels the model predicts at 0.90 or more filled in (category " in caplog.text
    last, best, before = (load_checkpoint(run / name) for name in ("last.pt", "best.pt", "best-before-filling.pt"))
    items = split_validation(read_catalog(demo_catalog).split_items("train"), 0.1)[0]
    filled = last["filled_labels"]
    assert set(filled) == {"category", "pattern", "sleeve", "gender"}  # the softmax groups (colours: multi-label)
    counts = {g: int((f >= 0).sum()) for g, f in filled.items()}
    assert counts["sleeve"] > 0 and all(len(f) == len(items) for f in filled.values())
    for g, labels in filled.items():
        assert all(not item.labels[g] for item, label in zip(items, labels.tolist()) if label >= 0)
    assert all(label == -1 for item, label in zip(items, filled["sleeve"].tolist())
               if item.labels["category"] in {("trousers",), ("shorts",), ("skirt",), ("bag",), ("hat",)})
    assert last["group_weights"]["sleeve"] > before["group_weights"]["sleeve"]  # more labels, more weight
    assert yaml.safe_load((run / "config.yaml").read_text())["fill_missing"] == 0.9
    assert before["train_config"]["fill_missing"] == "auto" and "filled_labels" not in before
    assert len(json.loads((run / "metrics-before-filling.json").read_text())) == 2
    second = max(r["val_map"] for r in json.loads((run / "metrics.json").read_text()))
    assert best["best_score"] == pytest.approx(max(before["best_score"], second))
    assert best.get("filled_labels", counts) == counts  # best.pt says how many, when it is the filled run's
    # resumed after it finished: the filled run is recognised (no third), nothing changes
    caplog.clear()
    assert fill_run(demo_catalog, tiny_run, tmp_path, "fill", "--resume") == 0
    assert "filled in" not in caplog.text
    assert load_checkpoint(run / "best.pt")["fingerprint"] == best["fingerprint"]
    assert not (tiny_run / "best-before-filling.pt").exists()  # --fill-missing 0 (TINY): one run


def test_fill_missing_resumes_where_it_stopped(auto_on_few_items, demo_catalog, tiny_run, tmp_path, monkeypatch):
    # stopped after the first run's best.pt was set aside (before the filling), then again after the
    # filled run's first epoch: each --resume goes on, and the run ends as one made straight through
    import retrieval.train.trainer as trainer

    assert fill_run(demo_catalog, tiny_run, tmp_path, "straight") == 0
    def stop(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(trainer.Job, "predict_missing", stop)
        with pytest.raises(KeyboardInterrupt):
            fill_run(demo_catalog, tiny_run, tmp_path, "stopped")
    run = tmp_path / "stopped"
    assert not (run / "best.pt").exists() and (run / "best-before-filling.pt").exists()
    save_epoch = trainer.Job.save_epoch
    def save_then_stop(job, optimizer, scheduler, epoch, *rest):
        save_epoch(job, optimizer, scheduler, epoch, *rest)
        if job.filled is not None and epoch == 0:
            raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(trainer.Job, "save_epoch", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            fill_run(demo_catalog, tiny_run, tmp_path, "stopped", "--resume")
    assert load_checkpoint(run / "last.pt")["epoch"] == 0
    assert fill_run(demo_catalog, tiny_run, tmp_path, "stopped", "--resume") == 0
    straight, resumed = (load_checkpoint(tmp_path / name / "last.pt") for name in ("straight", "stopped"))
    assert resumed["epoch"] == 1 and resumed["fingerprint"] == straight["fingerprint"]
    assert all(torch.equal(resumed["filled_labels"][g], f) for g, f in straight["filled_labels"].items())


def test_resume_refuses_per_item_state_when_the_training_items_changed(auto_on_few_items, demo_catalog, tmp_path,
                                                                       capsys):
    # filled labels and early learning's targets are kept by position among the training items: the
    # catalog's rows reversed put them on other images (silently), rows removed past the end (IndexError)
    import retrieval.train.trainer as trainer

    catalog = tmp_path / "cat"
    shutil.copytree(demo_catalog, catalog)
    save_epoch = trainer.Job.save_epoch

    def save_then_stop(job, optimizer, scheduler, epoch, *rest):
        save_epoch(job, optimizer, scheduler, epoch, *rest)
        raise KeyboardInterrupt

    lines = (catalog / "labels.csv").read_text().splitlines()
    for name, args in (("elr", ("--early-learning", "4")), ("plain", ())):
        (catalog / "labels.csv").write_text("\n".join(lines) + "\n")
        with pytest.MonkeyPatch.context() as m:
            m.setattr(trainer.Job, "save_epoch", save_then_stop)
            with pytest.raises(KeyboardInterrupt):
                train(catalog, tmp_path / name, "--epochs", "2", *args)
        (catalog / "labels.csv").write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
        capsys.readouterr()
        code = train(catalog, tmp_path / name, "--epochs", "2", "--resume", *args)
        if args:  # per-item state: refused, saying why
            assert code == 1 and "training or validation items changed since it was written" in capsys.readouterr().err
        else:  # nothing kept per item: it goes on, as before
            assert code == 0


def test_fill_missing_after_early_learning_trains_as_the_kept_run(auto_on_few_items, demo_catalog, tiny_run, tmp_path,
                                                                  monkeypatch, caplog):
    # auto's second run (early learning, forced here) and then the filling: the filled run trains with
    # the early-learning weight of the run kept before it, and a --resume after the end trains no more
    import retrieval.train.trainer as trainer

    monkeypatch.setattr(trainer, "memorising", lambda *a: "forced")
    assert fill_run(demo_catalog, tiny_run, tmp_path, "both") == 0
    run = tmp_path / "both"
    assert f"training again from the start with --early-learning {EARLY_LEARNING:g}" in caplog.text
    assert "filled in (" in caplog.text
    kept = load_checkpoint(run / "best-before-filling.pt")["train_config"]["early_learning"]
    last = load_checkpoint(run / "last.pt")
    assert last["train_config"]["early_learning"] == (0.0 if kept == "auto" else kept)
    assert ("early_learning" in last) == (kept == EARLY_LEARNING) and "filled_labels" in last
    assert (run / "best-without-early-learning.pt").exists()
    caplog.clear()
    assert fill_run(demo_catalog, tiny_run, tmp_path, "both", "--resume") == 0
    assert "training again" not in caplog.text and "filled in (" not in caplog.text
    assert load_checkpoint(run / "last.pt")["fingerprint"] == last["fingerprint"]


def test_auto_second_runs_need_twenty_validation_items(demo_catalog, tiny_run, tmp_path, caplog):
    # the demo catalog's 8 validation items are too few to choose between two runs: auto fills
    # nothing (and says so); an explicit confidence still fills
    import logging

    from retrieval.train.config import split_validation

    caplog.set_level(logging.INFO, logger="retrieval.train.trainer")
    assert len(split_validation(read_catalog(demo_catalog).split_items("train"), 0.1)[1]) < 20
    assert fill_run(demo_catalog, tiny_run, tmp_path, "few") == 0
    assert "validation items are too few to choose between a run with the missing labels filled" in caplog.text
    assert not (tmp_path / "few" / "best-before-filling.pt").exists()
    assert fill_run(demo_catalog, tiny_run, tmp_path, "asked", "--fill-missing", "0.9") == 0
    assert (tmp_path / "asked" / "best-before-filling.pt").exists()


def test_fill_missing_fills_only_labels_missing_at_random():
    # hand-worked: sleeve is labelled on 3 of 8 items (rate 0.375, half of it 0.1875); no trousers
    # has one (0 of 4: missing because it does not apply), 3 of 4 T-shirts do (0.75)
    from retrieval.data.datasets import Targets, missing_at_random

    kind = torch.tensor([[1, 0]] * 4 + [[0, 1]] * 4, dtype=torch.float)  # trousers, T-shirt
    sleeve = torch.tensor([[0, 0]] * 4 + [[1, 0], [0, 1], [1, 0], [0, 0]], dtype=torch.float)
    targets = Targets({"type": kind, "sleeve": sleeve}, {"type": kind.sum(1) > 0, "sleeve": sleeve.sum(1) > 0})
    assert missing_at_random(targets, "sleeve").tolist() == [False] * 4 + [True] * 4
    # types are labelled on all items of either sleeve: every type label may be filled
    assert missing_at_random(targets, "type").all()
    # an item without a type is judged by its other labels only (here none: fillable)
    kind[0] = 0
    targets = Targets({"type": kind, "sleeve": sleeve}, {"type": kind.sum(1) > 0, "sleeve": sleeve.sum(1) > 0})
    assert missing_at_random(targets, "sleeve").tolist() == [True] + [False] * 3 + [True] * 4


def test_fill_missing_option_is_auto_or_a_confidence(demo_catalog, tmp_path, capsys):
    for value in ("some", "1", "-0.5"):
        with pytest.raises(SystemExit) as exit_:
            train(demo_catalog, tmp_path / "x", "--fill-missing", value)
        assert exit_.value.code == 2 and "--fill-missing must be auto, 0 (off) or a confidence in (0, 1)" \
            in capsys.readouterr().err


def test_early_learning_option_is_auto_or_a_weight(demo_catalog, tmp_path, capsys):
    for value, why in (("some", "auto or a weight (0 = off), got 'some'"), ("-1", "a weight of 0 (off) or more")):
        with pytest.raises(SystemExit) as exit_:
            train(demo_catalog, tmp_path / "x", "--early-learning", value)
        assert exit_.value.code == 2 and why in capsys.readouterr().err


def test_a_run_folder_in_use_by_another_training_is_refused(demo_catalog, tiny_run, tmp_path, capsys):
    # two trains into one --out both exited 0, best.pt and last.pt holding one run's epochs; and a train
    # without --resume into a run rebuilt its trunk cache (for the refused settings) before refusing
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cache_time = (run / "trunk-cache.h5").stat().st_mtime_ns
    assert train(demo_catalog, run, "--epochs", "1", "--seed", "9") == 1
    assert "already holds a run (last.pt); pass --resume" in capsys.readouterr().err
    assert (run / "trunk-cache.h5").stat().st_mtime_ns == cache_time
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; "
                               f"fd = os.open({str(run / '.train.lock')!r}, os.O_RDWR | os.O_CREAT); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); os.write(fd, b'4242'); "
                               "print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert train(demo_catalog, run, "--epochs", "3", "--resume") == 1
        assert "is in use by another training (pid 4242)" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert train(demo_catalog, run, "--epochs", "3", "--resume") == 0  # released when its holder ends


def test_existing_run_is_not_overwritten(demo_catalog, tiny_run, capsys):
    assert train(demo_catalog, tiny_run, "--epochs", "1") == 1
    assert "pass --resume" in capsys.readouterr().err


def test_interrupted_trunk_cache_resumes(demo_catalog, tiny_run, tmp_path):
    import h5py

    cache = tmp_path / "trunk.h5"
    shutil.copy(tiny_run / "trunk-cache.h5", cache)
    with h5py.File(cache, "r+") as f:
        full = f["prefix"][:]
        f["prefix"][20:] = 0
        f.attrs["done"] = 20  # as if killed after 20 images
    assert train(demo_catalog, tmp_path / "r", "--epochs", "1", "--trunk-cache", str(cache)) == 0
    with h5py.File(cache) as f:
        assert f.attrs["done"] == 60
        assert (f["prefix"][:] == full).all()


def test_a_trunk_cache_that_cannot_be_read_is_built_again(demo_catalog, tiny_run, tmp_path, caplog):
    # cut short (a full disk, a copy stopped): h5py's "truncated file" traceback in train, embed, audit
    import h5py

    cache = tmp_path / "trunk.h5"
    cache.write_bytes((tiny_run / "trunk-cache.h5").read_bytes()[:5000])
    assert train(demo_catalog, tmp_path / "r", "--epochs", "1", "--trunk-cache", str(cache)) == 0
    assert "cannot be read" in caplog.text and "rebuilding" in caplog.text
    with h5py.File(cache) as f:
        assert f.attrs["done"] == 60
    cache.write_bytes(b"not HDF5")
    assert cli(["embed", "--checkpoint", str(tmp_path / "r" / "best.pt"), "--catalog", str(demo_catalog), "--out",
                str(tmp_path / "e.h5"), "--trunk-cache", str(cache), "--device", "cpu", "--workers", "0"]) == 0
    assert "cannot be read" in caplog.text and "computing from images" in caplog.text


def test_a_trunk_cache_another_process_writes_is_named_in_use_not_rebuilt(demo_catalog, tiny_run, tmp_path, capsys):
    # two runs sharing --trunk-cache: the lock error was taken for a corrupt file and the cache rebuilt
    # under the other run (or a BlockingIOError traceback)
    import time

    cache = tmp_path / "trunk.h5"
    shutil.copy(tiny_run / "trunk-cache.h5", cache)
    holder = subprocess.Popen([sys.executable, "-c", f"import h5py, time; f = h5py.File({str(cache)!r}, 'r+'); "
                               "print('open', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        before = cache.stat().st_mtime_ns
        assert train(demo_catalog, tmp_path / "r", "--epochs", "1", "--trunk-cache", str(cache)) == 1
        assert "is in use by another process" in capsys.readouterr().err and cache.stat().st_mtime_ns == before
    finally:
        holder.kill()
        holder.wait()
    # two runs started together, before either file existed: each laid out its own cache and did the whole
    # pass (the second's rename threw the first's away); the one making the cache now holds its lock
    fresh = tmp_path / "fresh.h5"
    from conftest import flock_held

    with flock_held(tmp_path / ".fresh.h5.lock", "4242"):
        assert train(demo_catalog, tmp_path / "r2", "--epochs", "1", "--trunk-cache", str(fresh)) == 1
        assert "is in use by another process" in capsys.readouterr().err and not fresh.exists()
    assert train(demo_catalog, tmp_path / "r2", "--epochs", "1", "--trunk-cache", str(fresh)) == 0
    # a finished cache is only read: in a folder where no lock file can be made (read-only, another
    # user's) it still serves (the lock taken first said "Permission denied")
    import retrieval.net.trunkcache as trunkcache

    def no_lock_file(path):
        raise PermissionError(13, "Permission denied", str(path))

    original = trunkcache.hold_lock
    trunkcache.hold_lock = no_lock_file
    try:
        assert train(demo_catalog, tmp_path / "r3", "--epochs", "1", "--trunk-cache", str(fresh)) == 0
    finally:
        trunkcache.hold_lock = original


def test_images_mode_skips_corrupt_images(demo_catalog, tmp_path, caplog):
    catalog = tmp_path / "cat"
    shutil.copytree(demo_catalog, catalog)
    broken = sorted((catalog / "images").glob("*.jpg"))[:2]
    for path in broken:
        path.write_bytes(path.read_bytes()[:100])  # truncated JPEG
    assert train(catalog, tmp_path / "run", "--epochs", "1", "--trainable-blocks", "all") == 0
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["input_mode"] == "images" and ckpt["start_unit"] == 0
    assert "unreadable" in caplog.text


def test_images_mode_keeps_its_loader_workers_and_follows_each_epochs_order(demo_catalog, tmp_path, monkeypatch):
    # one loader per split for the whole run (worker processes kept between epochs), and each epoch
    # still gets the order drawn for it
    from retrieval.train import sampling, trainer

    loaders, orders, seen = [], [], []
    real_order, real_batches = sampling.epoch_order, trainer.Job.image_batches

    class CountedLoader(trainer.DataLoader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            loaders.append(self.persistent_workers)

    def epoch_order(*args, **kwargs):
        orders.append(real_order(*args, **kwargs))
        return orders[-1]

    def image_batches(self, order):
        seen.append([int(i) for positions, _ in real_batches(self, order) for i in positions])
        yield from []  # nothing trained: only the order matters here

    monkeypatch.setattr(trainer, "DataLoader", CountedLoader)
    monkeypatch.setattr(sampling, "epoch_order", epoch_order)
    monkeypatch.setattr(trainer.Job, "image_batches", image_batches)
    argv = ["--epochs", "3", "--trainable-blocks", "all", "--workers", "1"]
    assert cli(["train", "--catalog", str(demo_catalog), "--out", str(tmp_path / "run"), *TINY, *argv]) == 0
    assert loaders == [True, True]  # train and validation, workers kept
    assert len(seen) == 3 and seen == [o.tolist() for o in orders[-3:]] and seen[0] != seen[1]  # (the first counts steps)


def test_images_mode_resumes_exactly_with_loader_workers(demo_catalog, tmp_path):
    # the resumed epoch starts new loader workers where the straight run keeps its own: the same weights
    argv = ["--trainable-blocks", "all", "--workers", "1"]
    assert train(demo_catalog, tmp_path / "straight", "--epochs", "2", *argv) == 0
    assert train(demo_catalog, tmp_path / "resumed", "--epochs", "1", *argv) == 0
    assert train(demo_catalog, tmp_path / "resumed", "--epochs", "2", "--resume", *argv) == 0
    resumed, straight = (load_checkpoint(tmp_path / run / "last.pt") for run in ("resumed", "straight"))
    assert resumed["epoch"] == straight["epoch"] == 1
    for key, value in straight["model"].items():
        assert torch.allclose(resumed["model"][key].float(), value.float(), atol=1e-6), key


def test_trainable_blocks_that_are_no_number_are_a_clear_error(demo_catalog, tmp_path, capsys):
    assert train(demo_catalog, tmp_path / "run", "--trainable-blocks", "two") == 1
    assert "--trainable-blocks must be a number of trunk units, all or auto; got 'two'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_auto_trainable_blocks_by_device_and_training_size():
    from retrieval.train.config import FULL_TUNING_MIN_ITEMS, resolve_blocks

    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
    assert resolve_blocks("auto", cpu, 10 * FULL_TUNING_MIN_ITEMS) == "0"  # CPU: always the frozen trunk
    assert resolve_blocks("auto", cuda, FULL_TUNING_MIN_ITEMS) == "all"
    assert resolve_blocks("auto", cuda, FULL_TUNING_MIN_ITEMS - 1) == "0"
    assert resolve_blocks("auto", cuda) == "all"  # size not considered: a paper's recipe
    assert resolve_blocks("2", cuda, 10) == "2" and resolve_blocks("all", cpu, 10) == "all"


def test_training_resolves_auto_blocks_with_its_training_size(demo_catalog, tmp_path, monkeypatch, capsys):
    import re

    import retrieval.train.trainer as trainer

    seen = []
    resolve = trainer.resolve_blocks
    monkeypatch.setattr(trainer, "resolve_blocks", lambda *a: seen.append(a) or resolve(*a))
    assert train(demo_catalog, tmp_path / "run", "--epochs", "1") == 0
    n_train = int(re.search(r"(\d+) training / \d+ validation items", capsys.readouterr().out).group(1))
    assert seen[0][0] == "auto" and seen[0][2] == n_train > 0
    assert train(demo_catalog, tmp_path / "recipe", "--epochs", "1", "--recipe", "li2017") == 0
    assert seen[1][2] is None  # a recipe fine-tunes the whole trunk on a GPU whatever the size


def test_trainable_blocks_cache_activations(demo_catalog, tmp_path, caplog):
    import h5py
    import numpy as np

    run = tmp_path / "run"
    assert train(demo_catalog, run, "--epochs", "1", "--trainable-blocks", "1") == 0
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["input_mode"] == "cached" and ckpt["start_unit"] == 3
    # the trained last unit changed the trunk, not the frozen units the cache depends on: embed
    # serves the catalogue from the training cache, and gets what the images give
    embed = ["embed", "--checkpoint", str(run / "last.pt"), "--catalog", str(demo_catalog), "--device", "cpu",
             "--workers", "0", "--batch-size", "16"]
    assert cli([*embed, "--out", str(tmp_path / "images.h5")]) == 0
    caplog.clear()
    assert cli([*embed, "--out", str(tmp_path / "cached.h5"), "--trunk-cache", str(run / "trunk-cache.h5")]) == 0
    assert "does not match" not in caplog.text
    with h5py.File(tmp_path / "images.h5") as a, h5py.File(tmp_path / "cached.h5") as b:
        assert np.allclose(a["vectors"][:], b["vectors"][:], atol=1e-4)
    assert_disk_reads_equal_memory(run / "trunk-cache.h5", *load_model(run / "last.pt"), acts=True)


def assert_disk_reads_equal_memory(cache, model, ckpt, acts=False):
    """A cache over its memory budget (0 bytes) reads each batch from disk: the same inputs, rows
    repeated and out of order, both views."""
    from retrieval.net.trunkcache import TrunkCache

    memory = TrunkCache(cache, model, ckpt["start_unit"])
    disk = TrunkCache(cache, model, ckpt["start_unit"], max_memory=0)
    assert disk.on_disk and not memory.on_disk and disk.prefix is None and disk.nbytes == memory.nbytes
    index, flip = torch.tensor([5, 0, 5, 2, 1]), torch.tensor([1, 0, 0, 1, 1])
    got, want = disk.inputs(index, flip), memory.inputs(index, flip)
    assert (got[1] is not None) == acts
    for a, b in zip(got, want):
        assert (a is None and b is None) or torch.equal(a, b)


def test_cache_memory_option_trains_from_disk_to_the_same_weights(demo_catalog, tmp_path, caplog, capsys):
    import logging

    caplog.set_level(logging.INFO, logger="retrieval.net.trunkcache")
    cache = ["--trunk-cache", str(tmp_path / "trunk.h5"), "--epochs", "2"]
    assert train(demo_catalog, tmp_path / "memory", *cache) == 0
    assert "more than the memory budget" not in caplog.text
    assert train(demo_catalog, tmp_path / "disk", *cache, "--cache-memory", "0") == 0
    assert "more than the memory budget; each batch reads its rows from disk" in caplog.text
    a, b = load_checkpoint(tmp_path / "memory" / "last.pt"), load_checkpoint(tmp_path / "disk" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    with pytest.raises(SystemExit) as done:
        train(demo_catalog, tmp_path / "bad", "--cache-memory", "-1")
    assert done.value.code == 2
    assert "--cache-memory must be a size in GB, 0 or more; got -1.0" in capsys.readouterr().err


def test_trunk_cache_key_follows_the_frozen_units_only():
    from retrieval.net.model import create_model
    from retrieval.net.trunkcache import cache_key

    model = create_model("tiny", {"g": ["a", "b"]}, 8, image_size=64)
    frozen, last = model.trunk.units[0], model.trunk.units[-1]
    whole = cache_key(model, len(model.trunk), [])
    assert json.loads(whole)["trunk"] == fingerprint(model.trunk)  # every unit frozen: as before
    key = cache_key(model, len(model.trunk) - 1, [])
    with torch.no_grad():
        next(last.parameters()).add_(1.0)  # a trained unit: same key
        assert cache_key(model, len(model.trunk) - 1, []) == key
        assert cache_key(model, len(model.trunk), []) != whole
        next(frozen.parameters()).add_(1.0)  # a frozen unit: another key
        assert cache_key(model, len(model.trunk) - 1, []) != key


def test_label_dropout_keeps_profile_share(demo_catalog, tmp_path):
    from retrieval.data.catalog import read_catalog
    from retrieval.data.datasets import drop_labels, parse_dropout_profile

    catalog = read_catalog(demo_catalog)
    items = catalog.split_items("train")
    keep = parse_dropout_profile("1.0,0.5,0.2", len(catalog.groups))
    assert keep == [1.0, 0.5, 0.2, 0.2, 0.2]
    assert parse_dropout_profile("paper", 7) == [1.0, 0.96, 0.82, 0.78, 0.68, 0.61, 0.60]
    assert parse_dropout_profile("paper", 3) == [1.0, 0.96, 0.82]
    with pytest.raises(ValueError, match="gives 7 shares for 5 groups"):  # the extra ones were dropped silently
        parse_dropout_profile("1,1,1,1,1,1,1", 5)
    with pytest.raises(ValueError, match=r"shares must lie in \(0, 1\]"):  # 0 blanked every label
        parse_dropout_profile("1,0", 5)
    dropped = drop_labels(items, catalog.groups, keep, seed=0)
    for g, share in zip(catalog.groups, keep):
        kept = sum(bool(d.labels[g]) for d in dropped)
        before = sum(bool(it.labels[g]) for it in items)
        assert kept <= before and kept <= round(share * len(items))
        # the kept labels are the original ones
        assert all(d.labels[g] in ((), it.labels[g]) for d, it in zip(dropped, items))
    assert drop_labels(items, catalog.groups, keep, seed=0) == dropped  # deterministic
    assert train(demo_catalog, tmp_path / "run", "--epochs", "1", "--label-dropout", "paper") == 0


def test_a_catalogs_val_split_is_the_validation(demo_catalog, tmp_path, capsys):
    # every third train row relabelled 'validation': those rows validate, the others all train
    root = tmp_path / "cat"
    shutil.copytree(demo_catalog, root)
    lines = (root / "labels.csv").read_text().splitlines()
    rows = [line.split(",") for line in lines[1:]]
    train_rows = [r for r in rows if r[1] == "train"]
    for r in train_rows[::3]:
        r[1] = "validation"
    (root / "labels.csv").write_text("\n".join([lines[0], *(",".join(r) for r in rows)]) + "\n")
    n_val = len(train_rows[::3])
    assert train(root, tmp_path / "run", "--epochs", "1", "--val-fraction", "0.5") == 0
    out = capsys.readouterr().out
    assert f"{len(train_rows) - n_val} training / {n_val} validation items (the val split)" in out
    assert train(demo_catalog, tmp_path / "plain", "--epochs", "1", "--val-fraction", "0.5") == 0
    assert "validation items (0.5 of the train split)" in capsys.readouterr().out


def test_options_this_run_cannot_use_are_said_to_be_off(demo_catalog, tiny_run, tmp_path, caplog):
    # they were accepted in silence: config.yaml said on, nothing was done
    shutil.copy(tiny_run / "trunk-cache.h5", tmp_path / "trunk.h5")
    assert train(demo_catalog, tmp_path / "a", "--epochs", "1", "--colour-bins", "none") == 0
    assert "label attention is off for this run: it needs the learned colour weighting" in caplog.text
    assert train(demo_catalog, tmp_path / "b", "--epochs", "1", "--method", "multi-label", "--early-learning", "4",
                 "--fill-missing", "0.5", "--trunk-cache", str(tmp_path / "trunk.h5")) == 0
    assert "--early-learning 4 is off: it holds the single-label (softmax) groups" in caplog.text
    assert "--fill-missing 0.5 is off: it fills single-label (softmax) groups" in caplog.text


def test_one_training_item_is_a_clear_error(tmp_path, capsys):
    # it trained no step (a batch of one is skipped) and wrote an untrained best.pt, exit 0
    from conftest import write_catalog

    root = write_catalog(tmp_path / "cat", ["a.jpg,train,,red,dress", "b.jpg,val,,blue,shirt", "c.jpg,test,,red,shirt"])
    assert train(root, tmp_path / "run", "--epochs", "1") == 1
    assert "1 training item (a.jpg) beside 1 validation item(s); at least 2 are needed" in capsys.readouterr().err
    assert not (tmp_path / "run" / "best.pt").exists()


def test_torchrun_two_processes_gloo(demo_catalog, tmp_path):
    result = torchrun_train(demo_catalog, tmp_path / "ddp", "--epochs", "1")
    assert "world 2" in result.stdout
    assert load_checkpoint(tmp_path / "ddp" / "last.pt")["epoch"] == 0


def test_torchrun_early_learning_targets_follow_every_rank(demo_catalog, tiny_run, tmp_path):
    # each rank is dealt another half of the items every epoch; the running targets of the items
    # another rank saw reach this one too, so after one epoch every item has one (sum 1 - 0.7), on
    # every rank alike (last.pt holds rank 0's), as without torchrun
    shutil.copy(tiny_run / "trunk-cache.h5", tmp_path / "trunk.h5")
    torchrun_train(demo_catalog, tmp_path / "ddp", "--epochs", "1", "--early-learning", "3",
                   "--trunk-cache", str(tmp_path / "trunk.h5"))
    targets = load_checkpoint(tmp_path / "ddp" / "last.pt")["early_learning"]
    multi = read_catalog(demo_catalog).multi_label_groups()
    binary = set(multi) | {attention_key(g) for g in multi}  # each head and its label attention
    assert multi and binary <= set(targets)
    for g, t in targets.items():
        if g in binary:  # held label by label: each label's target 0.3 x its sigmoid
            assert t.max() <= 0.3 + 1e-4 and (t.sum(1) > 0).float().mean() > 0.9, g
            continue
        seen = t.sum(1)
        assert seen.max() <= 0.3 + 1e-4, g  # one update each (momentum 0.7 from zero)
        assert (seen > 0.29).float().mean() > 0.9, g  # not only the half rank 0 was dealt


def test_torchrun_fill_missing_from_decoded_images(demo_catalog, tmp_path):
    # --fill-missing where the trunk trains (images decoded, no trunk cache) under torchrun: rank 0's
    # predictions fill every rank's labels (a label index or -1, missing labels only)
    from retrieval.train.config import split_validation

    result = torchrun_train(demo_catalog, tmp_path / "ddp", "--epochs", "1", "--trainable-blocks", "all",
                            "--fill-missing", "0.3")
    assert "filled in (category " in result.stderr
    last = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert last["input_mode"] == "images" and last["train_config"]["fill_missing"] == 0.3
    catalog = read_catalog(demo_catalog)
    items = split_validation(catalog.split_items("train"), 0.1)[0]
    filled = last["filled_labels"]
    assert sum(int((f >= 0).sum()) for f in filled.values()) > 0
    for g, labels in filled.items():
        assert labels.min() >= -1 and labels.max() < len(catalog.vocab[g])
        assert all(not item.labels[g] for item, label in zip(items, labels.tolist()) if label >= 0)


def test_predict_prints_every_group(tiny_run, demo_catalog, capsys):
    image = sorted((demo_catalog / "images").glob("*.jpg"))[0]
    assert cli(["predict", "--checkpoint", str(tiny_run / "best.pt"), str(image), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    labels = report[0]["labels"]
    assert set(labels) == {"category", "colours", "pattern", "sleeve", "gender"}
    assert len(labels["category"]) == 3 and all(0 <= p <= 1 for _, p in labels["category"])
    assert cli(["predict", "--checkpoint", str(tiny_run / "best.pt"), str(image)]) == 0
    assert "category" in capsys.readouterr().out


def test_predict_bad_image_is_a_clear_error(tiny_run, demo_catalog, tmp_path, capsys):
    bad = tmp_path / "x.jpg"
    bad.write_text("not an image")
    assert cli(["predict", "--checkpoint", str(tiny_run / "best.pt"), str(bad)]) == 1
    assert "x.jpg: cannot read image" in capsys.readouterr().err
    # beside a good one, the good one is still predicted (one bad file aborted the batch); status 1
    good = str(demo_catalog / "images" / "000000.jpg")
    assert cli(["predict", "--checkpoint", str(tiny_run / "best.pt"), good, str(bad), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [entry["image"] for entry in report] == [good, str(bad)]
    assert "category" in report[0]["labels"] and "cannot read image" in report[1]["error"]


@pytest.mark.parametrize("extra", [["--sampling", "over", "--sampling-group", "category"],
                                   ["--sampling", "under", "--sampling-group", "category"],
                                   ["--range-loss", "0.1", "--range-group", "category"],
                                   ["--weighting", "label"]])
def test_imbalance_options_train(demo_catalog, tiny_run, tmp_path, extra):
    shutil.copy(tiny_run / "trunk-cache.h5", tmp_path / "trunk.h5")
    assert train(demo_catalog, tmp_path / "run", "--epochs", "1", "--trunk-cache", str(tmp_path / "trunk.h5"),
                 *extra) == 0
    config = load_checkpoint(tmp_path / "run" / "last.pt")["train_config"]
    assert all(str(config[k.lstrip("-").replace("-", "_")]) == v for k, v in zip(extra[::2], extra[1::2]))


def test_sampling_needs_a_group(demo_catalog, tmp_path):
    with pytest.raises(SystemExit):
        train(demo_catalog, tmp_path / "run", "--sampling", "over")


def test_one_trunk_cache_serves_models_with_fewer_taps(demo_catalog, tiny_run, tmp_path):

    cache = tmp_path / "trunk.h5"
    shutil.copy(tiny_run / "trunk-cache.h5", cache)
    before = cache.stat().st_mtime_ns
    assert train(demo_catalog, tmp_path / "last", "--epochs", "1", "--taps", "last", "--trunk-cache", str(cache)) == 0
    assert cache.stat().st_mtime_ns == before  # reused, not rebuilt
    from retrieval.net.trunkcache import TrunkCache
    model, ckpt = load_model(tmp_path / "last" / "last.pt")
    full = TrunkCache(cache)
    sliced = TrunkCache(cache, model, ckpt["start_unit"])
    # the default colour feature comes first (the learned weighting's per-cell mass and map), then
    # every unit below the cut: 8 + 16 + 32 + 32 channels
    colour = full.prefix.shape[-1] - sum(model.trunk.channels[:ckpt["start_unit"]])
    assert colour == 144 * 64 + 32 * 64  # 144 colour bins and the 32-channel map, on 8 x 8 cells
    assert sliced.prefix.shape[-1] == colour + 32  # and the last unit of the tiny trunk only
    assert torch.equal(sliced.prefix, torch.cat([full.prefix[..., :colour], full.prefix[..., -32:]], -1))
    assert_disk_reads_equal_memory(cache, model, ckpt)  # the model's columns of the stored ones


def test_train_on_a_subset_of_groups(demo_catalog, tiny_run, tmp_path, capsys):
    shutil.copy(tiny_run / "trunk-cache.h5", tmp_path / "trunk.h5")
    assert train(demo_catalog, tmp_path / "run", "--epochs", "1", "--groups", "category,pattern",
                 "--trunk-cache", str(tmp_path / "trunk.h5")) == 0
    assert list(load_checkpoint(tmp_path / "run" / "last.pt")["model_config"]["groups"]) == ["category", "pattern"]
    assert train(demo_catalog, tmp_path / "bad", "--groups", "size") == 1
    assert "Unknown group(s) 'size'; choose from: 'category'" in capsys.readouterr().err


def test_killed_trunk_cache_resumes(demo_catalog, tmp_path):
    """A process killed mid-pass (no clean close) leaves a cache that resumes where it stopped."""
    import h5py

    cache = tmp_path / "trunk.h5"
    script = f"""
import os, sys
import retrieval.net.trunkcache as features
calls = []
original = features.frozen_outputs
def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) > 5:  # a probe and two batches (original + flip each) done: die without closing
        os._exit(3)
    return original(*args, **kwargs)
features.frozen_outputs = dying
from retrieval.cli import main
main({["train", "--catalog", str(demo_catalog), "--out", str(tmp_path / "r"), *TINY, "--epochs", "1",
       "--trunk-cache", str(cache)]!r})
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 3, result.stderr[-2000:]
    with h5py.File(cache) as f:
        assert f.attrs["done"] == 32  # two batches of 16
    assert train(demo_catalog, tmp_path / "r2", "--epochs", "1", "--trunk-cache", str(cache)) == 0
    with h5py.File(cache) as f:
        assert f.attrs["done"] == 60 and f["ok"][:].all()


def test_best_checkpoint_has_the_highest_validation_map(demo_catalog, tiny_run, tmp_path):
    shutil.copy(tiny_run / "trunk-cache.h5", tmp_path / "trunk.h5")
    assert train(demo_catalog, tmp_path / "run", "--epochs", "4", "--trunk-cache", str(tmp_path / "trunk.h5")) == 0
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for record in history:
        assert 0 <= record["val_map_shared"] <= 1 and 0 <= record["val_map_group"] <= 1
        assert record["val_map"] == pytest.approx((record["val_map_shared"] + record["val_map_group"]) / 2)
    best = max(history, key=lambda r: r["val_map"])  # the first of equals, as training keeps it
    assert load_checkpoint(tmp_path / "run" / "best.pt")["epoch"] == best["epoch"]
    assert train(demo_catalog, tmp_path / "by-loss", "--epochs", "4", "--select-by", "loss",
                 "--trunk-cache", str(tmp_path / "trunk.h5")) == 0
    history = json.loads((tmp_path / "by-loss" / "metrics.json").read_text())
    best = min(history, key=lambda r: r["val_loss"])
    assert load_checkpoint(tmp_path / "by-loss" / "best.pt")["epoch"] == best["epoch"]


def test_torchrun_images_mode_with_unreadable_images_on_one_rank(demo_catalog, tmp_path):
    # Ranks find unreadable images on their own shards: they must still take the same number of
    # steps (skipped batches, later epochs without those items), or DDP's all-reduce hangs.
    catalog = tmp_path / "catalog"
    shutil.copytree(demo_catalog, catalog)
    images = sorted((catalog / "images").glob("*.jpg"))
    for path in images[::3]:
        path.write_bytes(b"not an image")
    result = torchrun_train(catalog, tmp_path / "ddp", "--epochs", "2", "--batch-size", "2",
                            "--trainable-blocks", "all", timeout=240)
    assert "input images" in result.stdout and "world 2" in result.stdout
    assert load_checkpoint(tmp_path / "ddp" / "last.pt")["epoch"] == 1
    assert "unreadable training images were skipped" in result.stderr


def test_a_final_batch_of_one_is_skipped(demo_catalog, tmp_path):
    # 60 items, ~54 train: batch sizes that leave one item over would crash batch norm
    from retrieval.data.catalog import read_catalog
    from retrieval.train.config import split_validation

    n_train = len(split_validation(read_catalog(demo_catalog).split_items("train"), 0.1)[0])
    assert train(demo_catalog, tmp_path / "r", "--epochs", "1", "--batch-size", str(n_train - 1),
                 "--trunk-cache", str(tmp_path / "trunk.h5")) == 0


@pytest.fixture(scope="module")
def small_catalog(tmp_path_factory):
    from retrieval.data.demo import make_demo_catalog

    root = tmp_path_factory.mktemp("small")
    make_demo_catalog(root, n_items=16, seed=2, image_size=64)
    return root


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "resnet101", "dilated_resnet101", "seresnet50", "alexnet"])
def test_every_backbone_family_trains_in_the_default_mode(small_catalog, tmp_path, backbone):
    # default CPU mode: frozen trunk at 288 px, cached; random-weight ResNet-101s reach ~1.8e5 there,
    # past float16, which left inf in the cache and a NaN loss before the cache stored row scales
    import h5py
    import numpy as np

    run = tmp_path / backbone
    assert cli(["train", "--catalog", str(small_catalog), "--out", str(run), "--backbone", backbone,
                "--epochs", "1", "--workers", "0", "--device", "cpu", "--batch-size", "8"]) == 0
    history = json.loads((run / "metrics.json").read_text())
    assert np.isfinite(history[0]["train_loss"])
    with h5py.File(run / "trunk-cache.h5") as f:
        assert np.isfinite(f["prefix"][:]).all()


def test_predict_and_photo_search_score_a_photo_alike(tiny_run, demo_catalog):
    # one view rule (model.QUERY_VIEWS) for both interactive paths; predict used two views before
    import numpy as np
    from PIL import Image

    from retrieval.embed.inference import describe_image, predict_images

    model, _ = load_model(tiny_run / "best.pt")
    assert model.config.flip_average and model.catalog_views == 2
    image = sorted((demo_catalog / "images").glob("*.jpg"))[5]
    predicted = predict_images(model, [image])[0]
    searched = describe_image(model, Image.open(image))
    for g, p in predicted.items():
        assert np.allclose(p, searched.probs[g][0], atol=1e-6), g


def test_one_set_of_defaults():
    # TrainConfig's model options default to ModelConfig's, and the parser's to TrainConfig's
    from dataclasses import fields

    from retrieval.net.model import ModelConfig, model_options
    from retrieval.commands.train import parse_config
    from retrieval.train.config import TrainConfig

    assert parse_config(["--catalog", "c", "--out", "o"]) == TrainConfig("c", "o")
    options = model_options(TrainConfig("c", "o"))
    assert options and options == {k: getattr(ModelConfig(), k) for k in options}
    assert {f.name for f in fields(ModelConfig)} - set(options) == {"backbone", "groups", "multi_label_groups",
                                                                    "method", "embed_dim"}


def test_epochs_resolve_by_steps_on_a_small_catalogue(demo_catalog, tmp_path):
    from retrieval.data.catalog import read_catalog
    from retrieval.train.config import resolve_epochs, split_validation

    assert resolve_epochs(5, 3, 700) == 5  # given: as it is
    assert resolve_epochs(None, 54, 700) == 30  # the development catalog: 30 epochs are 1,620 steps
    assert resolve_epochs(None, 12, 700) == 59  # a 2,000-image catalogue: ceil(700 / 12)
    assert resolve_epochs(None, 0, 700) == 700
    # demo catalog, batches of 128: ceil(n / 128) steps an epoch, 100 steps wanted
    n = len(split_validation(read_catalog(demo_catalog).split_items("train"), 0.1)[0])
    steps = -(-n // 128)
    expected = max(30, -(-100 // steps))
    assert expected > 30
    run = tmp_path / "run"
    assert train(demo_catalog, run, "--batch-size", "128", "--min-steps", "100") == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["epochs"] == expected
    assert len(json.loads((run / "metrics.json").read_text())) == expected


def test_read_columns_keeps_the_asked_columns_without_the_whole_width(tmp_path):
    import h5py
    import numpy as np
    from retrieval.net.trunkcache import read_columns
    stored = np.arange(5 * 2 * 6, dtype=np.float16).reshape(5, 2, 6)
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f.create_dataset("prefix", data=stored, chunks=(2, 2, 6))
        for columns in (torch.tensor([0, 2, 5]), torch.tensor([4, 1])):
            got = read_columns(f["prefix"], columns, rows_at_a_time=2)  # three slices of rows: 2, 2, 1
            assert got.dtype == torch.float16 and torch.equal(got, torch.from_numpy(stored)[:, :, columns])
        assert torch.equal(read_columns(f["prefix"], torch.arange(6)), torch.from_numpy(stored))
        assert torch.equal(read_columns(f["prefix"], None), torch.from_numpy(stored))


@pytest.mark.parametrize("max_memory", [None, 0])  # held in memory, or read from disk per batch
def test_trunk_cache_refuses_values_that_are_not_finite(tmp_path, max_memory):
    import h5py
    import numpy as np
    from retrieval.net.trunkcache import TrunkCache

    prefix = np.zeros((3, 2, 4), np.float16)
    prefix[2, 1, 3] = np.inf  # row 2 is not marked done: never read, never checked
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f["prefix"], f["ok"] = prefix, np.array([True, True, False])
        f.attrs["key"] = json.dumps({"taps": []})
    assert TrunkCache(tmp_path / "c.h5", max_memory=max_memory).inputs(torch.tensor([1]), torch.tensor([1])
                                                                       )[0].shape == (1, 4)
    with h5py.File(tmp_path / "c.h5", "r+") as f:
        f["ok"][2] = True
    with pytest.raises(ValueError, match="cached pooled features are not finite .* catalog row 2"):
        TrunkCache(tmp_path / "c.h5", max_memory=max_memory)


def test_trunk_cache_memory_budget_is_shared_by_the_local_ranks(monkeypatch):
    from retrieval.net.trunkcache import MEMORY_SHARE, memory_budget

    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 2**20}[name])  # 4 GiB
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert memory_budget() == int(4 * 2**30 * MEMORY_SHARE)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert memory_budget() == int(4 * 2**30 * MEMORY_SHARE) // 4


def test_collectives_hold_their_tensors_until_the_workers_let_go(tmp_path):
    # A gloo worker that drops a collective's Python-made tensor last needs the GIL; at interpreter
    # exit that aborted finished torchrun runs. Collectives keeps them until no one else holds them.
    import threading
    import time

    import torch.distributed as dist

    from retrieval.devices import Collectives

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        c = Collectives(torch.device("cpu"))
        mask = c.all_reduce(torch.tensor([0, 1, 0], dtype=torch.uint8), dist.ReduceOp.MAX)
        assert mask.tolist() == [0, 1, 0] and c.held == [mask]
        holder = {"ref": mask.view(-1)}  # another holder, as a worker still holding the finished work
        assert mask._use_count() > 1
        threading.Timer(0.3, holder.clear).start()
        began = time.monotonic()
        c.release()
        assert time.monotonic() - began >= 0.25 and c.held == []
        assert mask._use_count() == 1
        # a reduction keeps the tensors still held elsewhere and drops those let go of
        first = c.all_reduce(torch.tensor([1]))
        holder = first.view(-1)
        second = c.all_reduce(torch.tensor([2]))
        assert [t is first for t in c.held] == [True, False]
        del holder
        c.release()  # waits out gloo's own hold on second
        c.held = [first, second]
        third = c.all_reduce(torch.tensor([3]))
        assert [t is third for t in c.held] == [True]
        stuck = third.view(-1)  # never let go: release gives up after its timeout
        began = time.monotonic()
        c.release(timeout_s=0.2)
        assert 0.2 <= time.monotonic() - began < 2 and c.held == [] and stuck is not None
    finally:
        dist.destroy_process_group()

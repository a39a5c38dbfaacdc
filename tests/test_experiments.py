"""The experiment harness reuses a finished stage only when it is newer than the catalog."""
import os
import shutil
from pathlib import Path

from retrieval import experiments
from retrieval.experiments import Experiment, finished, run_experiment


def test_a_stage_older_than_the_catalog_is_not_reused(tmp_path):
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    labels, output = catalog / "labels.csv", tmp_path / "base.h5"
    labels.write_text("image\n")
    output.write_text("x")
    os.utime(labels, (1_000, 1_000))
    os.utime(output, (2_000, 2_000))
    assert finished(output, str(catalog))
    os.utime(labels, (3_000, 3_000))  # the catalog was written again after the output
    assert not finished(output, str(catalog))
    assert not finished(tmp_path / "absent.h5", str(catalog))


def test_rerun_embeds_again_after_the_catalog_changes(demo_catalog, tmp_path, monkeypatch):
    catalog = tmp_path / "catalog"
    shutil.copytree(demo_catalog, catalog)
    calls = []
    real_cli = experiments.cli

    def counting_cli(argv):
        calls.append(argv[0])
        return real_cli(argv)

    monkeypatch.setattr(experiments, "cli", counting_cli)
    exp = lambda: Experiment("base", None, embed=["--backbone", "tiny", "--image-size", "64"])  # noqa: E731
    run_experiment(exp(), str(catalog), tmp_path)
    run_experiment(exp(), str(catalog), tmp_path)
    assert calls == ["embed", "evaluate", "evaluate"]  # the second run reuses the embedding
    stamp = (tmp_path / "base.h5").stat().st_mtime + 10
    os.utime(catalog / "labels.csv", (stamp, stamp))
    again = run_experiment(exp(), str(catalog), tmp_path)
    assert calls[3:] == ["embed", "evaluate"]
    assert again.report["mean"]["map_paper"] is not None


def test_transfer_rows_share_a_trunk_cache_when_their_frozen_pass_is_the_same():
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from experiment_transfer import trunk_cache_name

    assert trunk_cache_name([]) == trunk_cache_name(["--dropout", "0.5", "--loss-norm", "item"]) == "trunk-cache.h5"
    assert trunk_cache_name(["--colour-weighting", "learned"]) == "trunk-cache.h5"  # the default
    # the attended poolings reweight the same cached map
    assert trunk_cache_name(["--pool-weighting", "learned"]) == trunk_cache_name(["--pool-weighting", "none"]) \
        == trunk_cache_name(["--pool-weighting", "map"]) == "trunk-cache.h5"
    assert trunk_cache_name(["--head-fit", "0", "--epochs", "30"]) == "trunk-cache.h5"  # training only
    assert trunk_cache_name(["--colour-weighting", "border"]) == "trunk-cache-colour_weighting=border.h5"
    assert trunk_cache_name(["--pool-weighting", "foreground"]) == "trunk-cache-pool_weighting=foreground.h5"
    assert trunk_cache_name(["--recipe", "li2017"]) == "trunk-cache-recipe-li2017.h5"  # not read: its own


def test_transfer_table_names_its_colour_group_and_leaves_the_columns_empty_without_one(tmp_path):
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import pytest
    from conftest import write_catalog
    from experiment_transfer import _cells, format_tables, pick_colour_group

    rows = ["a.jpg,train,,red,shirt", "b.jpg,test,,blue,dress"]
    coloured = write_catalog(tmp_path / "coloured", rows, header="image,split,title,type,mainColor")
    plain = write_catalog(tmp_path / "plain", rows, header="image,split,title,type,fit")
    assert pick_colour_group(str(coloured)) == "mainColor"  # "color" says colour too
    assert pick_colour_group(str(coloured), "type") == "type"
    with pytest.raises(SystemExit, match="no group 'hue'"):
        pick_colour_group(str(coloured), "hue")
    assert pick_colour_group(str(plain)) is None

    def report(shared, colour):  # an evaluation report's shape: means and groups
        entry = lambda m: {"map_paper": m, "map_standard": m / 2, "group_view": {"map_paper": m + 0.1,  # noqa: E731
                                                                                 "map_standard": m}}
        return {"mean": entry(shared), "groups": {"mainColor": entry(colour), "type": entry(0.9)}}

    results = {
        "retailer": {name: {**_cells(report(s, c), "mainColor"), "colour group": "mainColor"}
                     for name, s, c in [("imagenet", 0.5, 0.2), ("default", 0.6, 0.35)]},
        "plain": {name: {**_cells(report(s, c), None), "colour group": None}
                  for name, s, c in [("imagenet", 0.5, 0.2), ("default", 0.58, 0.35)]},
    }
    results["retailer"]["default"]["shared, embedding alone"] = (59.0, 29.5)
    text = format_tables(results)
    assert "| retailer | default | 50.0 / 25.0 | 60.0 / 30.0 | 59.0 / 29.5 | 70.0 / 60.0 |" in text
    assert "| plain | default | 50.0 / 25.0 | 58.0 / 29.0 | – | 68.0 / 58.0 |" in text  # an older results.json
    # shared +10 and group view +20 over the off-the-shelf shared 50; colour +15 and +25 over its 20
    assert "| retailer | default | +10.0 met | +20.0 met | +15.0 met | +25.0 met |" in text
    assert "| plain | default | +8.0 met | +18.0 met | – | – |" in text
    assert text.endswith("Colour columns: retailer: mainColor, plain: none")


def test_a_stopped_training_is_resumed_not_taken_for_finished(demo_catalog, tmp_path, monkeypatch):
    """best.pt is written from the first epoch, so a run stopped after it has one: the harness
    resumes it (train --resume) and reuses it only once train has returned."""
    import json

    import pytest
    from conftest import TINY
    from retrieval.train.trainer import Job

    calls = []
    real_cli, real_save = experiments.cli, Job.save_epoch

    def counting_cli(argv):
        calls.append(argv)
        return real_cli(argv)

    def stopped_after_the_first_epoch(self, optimizer, scheduler, epoch, *args, **kwargs):
        real_save(self, optimizer, scheduler, epoch, *args, **kwargs)
        if epoch == 0:
            raise KeyboardInterrupt  # as a killed process: the epoch's files are written, nothing after

    monkeypatch.setattr(experiments, "cli", counting_cli)
    monkeypatch.setattr(Job, "save_epoch", stopped_after_the_first_epoch)
    exp = lambda: Experiment("run", ["--epochs", "3", *TINY], embed=["--workers", "0"])  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        run_experiment(exp(), str(demo_catalog), tmp_path)
    run = tmp_path / "run"
    assert (run / "best.pt").exists() and not experiments.trained(run, str(demo_catalog))

    monkeypatch.setattr(Job, "save_epoch", real_save)
    run_experiment(exp(), str(demo_catalog), tmp_path)
    assert calls[1][0] == "train" and calls[1][-1] == "--resume"
    assert [r["epoch"] for r in json.loads((run / "metrics.json").read_text())] == [0, 1, 2]
    assert experiments.trained(run, str(demo_catalog))

    calls.clear()
    run_experiment(exp(), str(demo_catalog), tmp_path)
    assert [argv[0] for argv in calls] == ["evaluate"]  # training and embedding reused
    (run / experiments.TRAINED).unlink()  # a run finished before the marker: metrics.json reached the epochs
    assert experiments.trained(run, str(demo_catalog))


def test_transfer_reuse_copies_every_trunk_cache_and_keeps_what_is_there(tmp_path):
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from experiment_transfer import take_reused

    source, folder = tmp_path / "earlier", tmp_path / "work" / "street"
    source.mkdir()
    for name in ("trunk-cache.h5", "trunk-cache-image_size=352.h5", "imagenet.h5", "default.h5",
                 ".trunk-cache.h5.host-1.tmp"):
        (source / name).write_text(name)
    assert take_reused(source, folder) == ["trunk-cache-image_size=352.h5", "trunk-cache.h5", "imagenet.h5"]
    assert sorted(p.name for p in folder.iterdir()) == ["imagenet.h5", "trunk-cache-image_size=352.h5",
                                                        "trunk-cache.h5"]  # no runs, no temporaries
    (folder / "trunk-cache.h5").write_text("resumed here")
    assert take_reused(source, folder) == []  # what is there stays
    assert (folder / "trunk-cache.h5").read_text() == "resumed here"
    (tmp_path / "bare").mkdir()
    assert take_reused(tmp_path / "bare", tmp_path / "other") == []  # nothing to take is no error

"""The console script: top-level help, every command's --help, unknown commands."""
import pytest

from retrieval.cli import COMMANDS, main as cli


def test_top_level_help_lists_every_command(capsys):
    assert cli(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_explains_itself(name, capsys):
    with pytest.raises(SystemExit) as done:
        cli([name, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert f"retrieval {name}" in out and len(out.splitlines()) > 3


def test_unknown_command_lists_valid_ones(capsys):
    assert cli(["trian"]) == 2
    assert "choose one of: demo-catalog" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["train", "--catalog", "c", "--out", "o", "--image-size", "-5"], "argument --image-size: -5 is under 32"),
    (["cache", "--catalog", "c", "--out", "o", "--image-size", "0"], "argument --image-size: 0 is under 32"),
    (["embed", "--pretrained-only", "--catalog", "c", "--out", "o", "--image-size", "big"], "'big' is not a whole"),
    (["predict", "--checkpoint", "x.pt", "--top", "0", "a.jpg"], "argument --top: 0 is under 1"),
    (["train", "--catalog", "c", "--out", "o", "--batch-size", "1"], "argument --batch-size: 1 is under 2"),
    (["train", "--catalog", "c", "--out", "o", "--epochs", "0"], "argument --epochs: 0 is under 1"),
    (["train", "--catalog", "c", "--out", "o", "--lr", "-1"], "argument --lr: -1 is not above 0"),
    (["train", "--catalog", "c", "--out", "o", "--lr", "nan"], "argument --lr: nan is not above 0"),
    (["train", "--catalog", "c", "--out", "o", "--range-loss", "-1"], "argument --range-loss: -1 is not at least 0"),
    (["train", "--catalog", "c", "--out", "o", "--val-fraction", "1"], "--val-fraction: 1 is not a share from 0 up to"),
    # ZeroDivisionError (the last after the trunk pass), a negative-dimension tensor, or a model trained
    # on a 0-wide embedding
    (["train", "--catalog", "c", "--out", "o", "--gem-p", "0"], "argument --gem-p: 0 is not above 0"),
    (["train", "--catalog", "c", "--out", "o", "--smoothing-c", "0"], "argument --smoothing-c: 0 is not above 0"),
    (["train", "--catalog", "c", "--out", "o", "--head-scale", "0"], "argument --head-scale: 0 is not above 0"),
    (["train", "--catalog", "c", "--out", "o", "--embed-dim", "0"], "argument --embed-dim: 0 is under 1"),
    (["train", "--catalog", "c", "--out", "o", "--early-learning-momentum", "5"],
     "argument --early-learning-momentum: 5 is not a share from 0 up to"),
    (["train", "--catalog", "c", "--out", "o", "--trunk-lr-scale", "-1"], "argument --trunk-lr-scale: -1 is not above 0"),
    # --folds 0 or 1 wrote 35 / 118 "issues" scored by heads that had seen the items
    (["audit", "--checkpoint", "x.pt", "--catalog", "c", "--out", "o", "--folds", "1"], "argument --folds: 1 is under 2"),
    (["audit", "--checkpoint", "x.pt", "--catalog", "c", "--out", "o", "--min-confidence", "0"],
     "argument --min-confidence: 0 is not a share above 0 and up to 1"),
])
def test_sizes_and_counts_out_of_range_are_usage_errors(argv, message, capsys):
    # they were tracebacks from torch or HDF5 (a negative image size), or silently dropped a label (--top -1)
    with pytest.raises(SystemExit) as done:
        cli(argv)
    assert done.value.code == 2 and message in capsys.readouterr().err


def test_ctrl_c_ends_the_console_script_with_one_line(monkeypatch, capsys):
    import retrieval.cli

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(retrieval.cli, "dispatch", interrupted)
    monkeypatch.setattr("sys.argv", ["retrieval", "embed", "--out", "x.h5"])
    assert retrieval.cli.main() == 130  # the console script: no traceback
    assert "retrieval embed: interrupted; what it finished is kept" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):  # an explicit argument list (tests, scripts): it propagates
        retrieval.cli.main(["embed"])


def test_a_place_that_cannot_be_written_is_one_line(monkeypatch, capsys):
    # a read-only or full disk, no permission: tracebacks from os.mkdir, mkdtemp or h5py before
    import errno
    import types

    import retrieval.cli

    def failing(err):
        return types.SimpleNamespace(main=lambda argv: (_ for _ in ()).throw(err))

    for err, shown in ((OSError(errno.EROFS, "Read-only file system", "ro/run"), "Read-only file system: 'ro/run'"),
                       (OSError("Unable to synchronously create file (unable to open file: name = 'ro/e.h5', "
                                "errno = 30, error message = 'Read-only file system')"), "errno = 30")):
        monkeypatch.setattr(retrieval.cli.importlib, "import_module", lambda name, err=err: failing(err))
        assert cli(["embed"]) == 1 and shown in capsys.readouterr().err
    monkeypatch.setattr(retrieval.cli.importlib, "import_module",
                        lambda name: failing(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError):  # anything else stays a traceback (a bug or the machine, not a place)
        cli(["embed"])


def test_sub_packages_import_in_flow_order():
    # data <- net, evaluate <- embed, train <- audit, recipes <- commands; no package imports a later one
    import re
    from pathlib import Path

    order = {"atomic": 0, "devices": 0, "data": 1, "net": 2, "evaluate": 2, "embed": 3, "train": 3, "audit": 4,
             "recipes": 4, "commands": 5}
    root = Path(__file__).resolve().parents[1] / "retrieval"
    backwards = []
    for path in root.rglob("*.py"):
        pkg = path.relative_to(root).parts[0].removesuffix(".py")
        for used in re.findall(r"^\s*(?:from|import) retrieval\.([a-z_]+)", path.read_text(), re.M):
            if pkg in order and used in order and used != pkg and order[used] >= order[pkg]:
                backwards.append(f"{path.relative_to(root)} imports retrieval.{used}")
    assert backwards == []
    web = Path(__file__).resolve().parents[1] / "web"
    assert not [p.name for p in web.glob("*.py") if "retrieval.commands" in p.read_text()]


def test_train_help_shows_each_default_once(capsys):
    # argparse's formatter said "(default: all) (default: None)" and nothing for --lr, --backbone, --seed
    with pytest.raises(SystemExit):
        cli(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: all) (default" not in text
    assert "learning rate (default: 0.002)" in text and "the trunk network (default: efficientnet_lite0)" in text
    assert "--resume continue RUN/last.pt" in text  # a switch has no "(default: False)"

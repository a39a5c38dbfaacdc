"""The ``retrieval`` console script: one subcommand per stage, each a module with ``main(argv)``."""
from __future__ import annotations

import errno
import importlib
import logging
import sys

COMMANDS = {
    "demo-catalog": ("retrieval.commands.demo", "generate the built-in demo catalog of drawn garments"),
    "catalog-info": ("retrieval.commands.info", "check a catalog and print a per-group summary"),
    "cache": ("retrieval.commands.cache", "pre-decode resized catalog images into HDF5 for fast loading"),
    "train": ("retrieval.commands.train", "train a multi-weight / multi-task / multi-label model"),
    "predict": ("retrieval.commands.predict", "print each group's labels with probabilities for images"),
    "embed": ("retrieval.commands.embed", "embed every catalog image into an HDF5 file"),
    "index": ("retrieval.commands.index", "build, add to or remove from a FAISS index directory"),
    "evaluate": ("retrieval.commands.evaluate", "per-group mAP@k of embeddings, or --compare reports"),
    "audit": ("retrieval.commands.audit", "rank likely wrong / missing labels; 'audit apply' corrects a copy"),
    "serve": ("web.serve", "serve the search web UI and JSON API"),
}


def usage() -> str:
    """The top-level help text."""
    lines = ["usage: retrieval COMMAND [options]   (retrieval COMMAND --help for details)", "", "commands:"]
    lines += [f"  {name:<14} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def configure_logging(level: int = logging.INFO) -> None:
    """Plain log lines on stderr, for entry points only."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which CPU build it tried, at every start


PLACE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EISDIR, errno.ENOTDIR,
                errno.ENAMETOOLONG}


def place_error(err: OSError) -> bool:
    """Whether an OSError is about the place a command reads or writes (permission, a read-only or full
    disk, a folder where a file goes): told in one line like the commands' own errors, not a traceback.
    h5py raises a plain OSError with the errno in its message."""
    return err.errno in PLACE_ERRNOS or any(f"errno = {n}," in str(err) for n in PLACE_ERRNOS)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``retrieval COMMAND ...`` to the command's module. Run as the console script (no
    ``argv``), Ctrl-C ends it with one line and status 130 instead of a traceback; called with
    ``argv`` (tests, scripts) the KeyboardInterrupt propagates."""
    if argv is None:
        try:
            return dispatch(sys.argv[1:])
        except KeyboardInterrupt:
            print(f"\nretrieval {sys.argv[1] if len(sys.argv) > 1 else ''}: interrupted; what it finished is kept "
                  "(run the same command again to resume; a training run with --resume, from its last.pt, written "
                  "at the end of each better epoch and of any epoch ending 30 s or more after its last save)",
                  file=sys.stderr)
            return 130
    return dispatch(argv)


def dispatch(argv: list[str]) -> int:
    """``main`` for an explicit argument list."""
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"retrieval: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    configure_logging()
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return module.main(rest) or 0
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"retrieval {name}: error: {message}", file=sys.stderr)
        return 1
    except OSError as err:
        if not place_error(err):
            raise
        print(f"retrieval {name}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

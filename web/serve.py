"""``retrieval serve``: the search web UI and JSON API on waitress (a production WSGI server)."""
from __future__ import annotations

import argparse
import logging
import os
import threading
from pathlib import Path
from dataclasses import asdict, dataclass, fields

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerLimits:
    """What waitress lets clients hold. An idle or half-sent connection costs a socket, never a thread."""

    connection_limit: int = 1000  # open connections; waitress's 100 let 110 idle sockets lock everyone out
    channel_timeout: int = 30  # seconds without a byte before an idle or half-sent connection is closed
    cleanup_interval: int = 5  # seconds between the sweeps that close them
    backlog: int = 1024  # connections the kernel queues while the limit is reached

    def waitress_options(self, max_body: int | None) -> dict:
        """Return create_server keywords; max_body (bytes) refuses larger bodies before they are read."""
        options = {**asdict(self), "asyncore_use_poll": True}  # select() fails past 1024 descriptors
        if max_body:
            options["max_request_body_size"] = int(max_body)
        return options

    def check(self) -> None:
        """Raise ValueError naming the option when a limit is below 1."""
        for name, value in asdict(self).items():
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


LIMIT_HELP = {  # option: (metavar, help)
    "connection_limit": ("N", "open connections at once; more wait in the backlog"),
    "channel_timeout": ("SECONDS", "seconds of silence after which a connection is closed"),
    "cleanup_interval": ("SECONDS", "seconds between sweeps for silent connections"),
    "backlog": ("N", "connections queued by the kernel while the connection limit is reached"),
}


def get_args_parser() -> argparse.ArgumentParser:
    """Parser of ``retrieval serve``."""
    p = argparse.ArgumentParser(prog="retrieval serve", description=(
        "Serve the catalogue browser, search by photo and the JSON API. The index is reloaded "
        "without a restart when scripts/rebuild_index.sh replaces INDEX_DIR."))
    data = p.add_argument_group("data")
    data.add_argument("--index", required=True, metavar="INDEX_DIR", help="index directory ('retrieval index build')")
    data.add_argument("--catalog", required=True, metavar="DIR", help="the catalog the index was built from")
    data.add_argument("--checkpoint", metavar="RUN/best.pt",
                      help="model for search by photo; its fingerprint must match the index (default: none, "
                           "search by photo disabled)")
    data.add_argument("--report", metavar="REPORT_DIR", help="'retrieval evaluate' output for the evaluation page")
    data.add_argument("--audit", metavar="AUDIT_DIR", help="'retrieval audit' output for the label review page")
    data.add_argument("--review", action="store_true",
                      help="let the label review page record decisions in AUDIT_DIR/decisions.csv (default: off, read-only)")
    data.add_argument("--cache-dir", metavar="DIR", help="thumbnail cache (default: the app's instance/thumbs)")
    server = p.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    server.add_argument("--port", type=port_number, default=8000, help="port (default: 8000; 0 = any free port)")
    server.add_argument("--threads", type=int, default=4, help="request threads (default: 4)")
    server.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:N (default: cpu)")
    server.add_argument("--max-upload-mb", type=megabytes, default=10.0,
                        help="request body limit: larger uploads get 413 before they are read (default: 10 MB)")
    limits = p.add_argument_group("connection limits (see README, 'Reliability: web server')")
    for field in fields(ServerLimits):
        metavar, text = LIMIT_HELP[field.name]
        limits.add_argument(f"--{field.name.replace('_', '-')}", type=int, default=field.default, metavar=metavar,
                            help=f"{text} (default: {field.default})")
    return p



def server_limits(args: argparse.Namespace) -> ServerLimits:
    """Return the checked connection limits of parsed ``retrieval serve`` options."""
    limits = ServerLimits(**{field.name: getattr(args, field.name) for field in fields(ServerLimits)})
    limits.check()
    return limits


def ensure_file_limit(connections: int, spare: int = 256) -> None:
    """Raise the soft open-file limit to fit the connection limit, or fail naming both numbers."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = connections + spare
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise ValueError(f"--connection-limit {connections} needs {needed} open files; the hard limit is "
                             f"{hard} (lower --connection-limit or raise 'ulimit -Hn')")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def app_config(args: argparse.Namespace) -> dict:
    """Return the Flask config of parsed ``retrieval serve`` options."""
    config = {"INDEX_DIR": args.index, "CATALOG_DIR": args.catalog, "CHECKPOINT": args.checkpoint,
              "REPORT_DIR": args.report, "DEVICE": args.device,
              "AUDIT_DIR": args.audit, "REVIEW": bool(args.review), "MAX_CONTENT_LENGTH": int(args.max_upload_mb * 1e6)}
    if args.cache_dir:
        config["THUMB_DIR"] = args.cache_dir
    return config  # create_app makes every path absolute


def megabytes(text: str) -> float:
    """An upload limit for argparse: a number above 0 (-1 started a server whose every upload was a 413
    "limit is -1 MB"). Like the commands' number_above(0), which web may not import."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of MB")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value:g} is not above 0")
    return value


megabytes.__name__ = "float"


def check_cache_dir(directory: Path, name: str) -> None:
    """Create the thumbnail cache folder now, or raise a ValueError naming it (a file there made every
    thumbnail a 500); one that exists but cannot be written serves what it holds, with a warning."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{name} {directory}: cannot be the thumbnail cache "
                         f"({'it is a file, not a folder' if directory.is_file() else err.strerror or err})") from None
    if not os.access(directory, os.W_OK | os.X_OK):  # a cache filled beforehand (flask thumbs), then locked
        logger.warning("%s %s cannot be written: thumbnails it lacks are answered 503", name, directory)


def port_number(text: str) -> int:
    """A TCP port for argparse: 0 (any free one) to 65535 (70000 wrapped round to 4464)."""
    try:
        port = int(text)
    except ValueError:  # web imports nothing of the CLI commands (test_sub_packages_import_in_flow_order)
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (0 to 65535)")
    return port


def make_server(app, host: str = "127.0.0.1", port: int = 0, threads: int = 4, limits: ServerLimits | None = None):
    """Return a waitress server for app (port 0 picks a free port: see server.effective_port); request
    bodies over the app's MAX_CONTENT_LENGTH are refused by waitress as they arrive."""
    from waitress import create_server

    options = (limits or ServerLimits()).waitress_options(app.config.get("MAX_CONTENT_LENGTH"))
    return create_server(app, host=host, port=port, threads=threads, ident="clothing-search", **options)


class BackgroundServer:
    """waitress serving an app from a daemon thread (tests, scripts); close() stops it quietly."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, threads: int = 4,
                 limits: ServerLimits | None = None):
        self.server = make_server(app, host, port, threads, limits)
        self.url = f"http://{host}:{self.server.effective_port}"
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="waitress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.server.run()
        except (OSError, ValueError):
            if not self._closing.is_set():  # closing sockets under select() is expected on close()
                raise

    def close(self) -> None:
        """Stop accepting, close open connections and the worker threads."""
        self._closing.set()
        self.server.close()
        for channel in list(self.server._map.values()):  # kept-alive client connections
            channel.close()
        self.server.task_dispatcher.shutdown()
        self._thread.join(5)


def start_background_server(app, host: str = "127.0.0.1", port: int = 0, threads: int = 4,
                            limits: ServerLimits | None = None) -> BackgroundServer:
    """Start waitress in a daemon thread (port 0: a free port); see .url, stop with .close()."""
    return BackgroundServer(app, host, port, threads, limits)


def use_one_thread_per_search() -> None:
    """Run each FAISS search on one core: requests already run in parallel, and OpenMP fan-out of a
    single query costs more than it saves (3 ms vs 20 ms for 50k x 256 flat on 2 shared cores)."""
    import faiss

    faiss.omp_set_num_threads(1)


def main(argv=None) -> int:
    """Entry point of ``retrieval serve``: check the configuration, then serve until interrupted."""
    from web import create_app

    args = get_args_parser().parse_args(argv)
    if args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    if args.review and not args.audit:
        raise ValueError("--review needs --audit AUDIT_DIR (written by 'retrieval audit')")
    if args.audit and not (Path(args.audit) / "issues.csv").is_file():  # else a nav link that answers 503
        raise ValueError(f"--audit {args.audit}: no issues.csv there (write it with 'retrieval audit --out "
                         f"{args.audit} ...')")
    limits = server_limits(args)
    ensure_file_limit(limits.connection_limit)
    use_one_thread_per_search()
    app = create_app(app_config(args))
    check_cache_dir(Path(app.config["THUMB_DIR"]), "--cache-dir" if args.cache_dir else "the thumbnail cache")
    snapshot = app.extensions["retrieval"].warm_up()  # refuses a fingerprint mismatch before listening
    try:
        server = make_server(app, args.host, args.port, args.threads, limits)
    except OSError as err:  # a port in use, an address this machine does not have
        raise ValueError(f"cannot listen on {args.host}:{args.port} ({err.strerror or err}); "
                         "choose another --port or --host") from None
    upload = "on" if args.checkpoint else "off (no --checkpoint)"
    review = "" if not args.audit else ("; label review records decisions" if args.review else
                                        "; label review read-only (add --review to record decisions)")
    print(f"Serving {len(snapshot.store)} items from {args.index} on http://{args.host}:{server.effective_port}/ "
          f"(search by photo {upload}{review}; Ctrl-C stops)", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        logger.info("Stopping")
    finally:
        server.close()
    return 0

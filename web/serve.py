"""``retrieval serve``: the search web UI and JSON API on waitress (a production WSGI server)."""
from __future__ import annotations

import argparse
import logging
import threading

logger = logging.getLogger(__name__)


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
    data.add_argument("--cache-dir", metavar="DIR", help="thumbnail cache (default: the app's instance/thumbs)")
    server = p.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    server.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 = any free port)")
    server.add_argument("--threads", type=int, default=4, help="request threads (default: 4)")
    server.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:N (default: cpu)")
    server.add_argument("--max-upload-mb", type=float, default=10.0, help="upload size limit (default: 10 MB)")
    return p


def app_config(args: argparse.Namespace) -> dict:
    """Return the Flask config of parsed ``retrieval serve`` options."""
    config = {"INDEX_DIR": args.index, "CATALOG_DIR": args.catalog, "CHECKPOINT": args.checkpoint,
              "REPORT_DIR": args.report, "DEVICE": args.device, "MAX_CONTENT_LENGTH": int(args.max_upload_mb * 1e6)}
    if args.cache_dir:
        config["THUMB_DIR"] = args.cache_dir
    return config  # create_app makes every path absolute


def make_server(app, host: str = "127.0.0.1", port: int = 0, threads: int = 4):
    """Return a waitress server for app (port 0 picks a free port: see server.effective_port)."""
    from waitress import create_server

    return create_server(app, host=host, port=port, threads=threads, ident="clothing-search")


class BackgroundServer:
    """waitress serving an app from a daemon thread (tests, scripts); close() stops it quietly."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, threads: int = 4):
        self.server = make_server(app, host, port, threads)
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


def start_background_server(app, host: str = "127.0.0.1", port: int = 0, threads: int = 4) -> BackgroundServer:
    """Start waitress in a daemon thread (port 0: a free port); see .url, stop with .close()."""
    return BackgroundServer(app, host, port, threads)


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
    use_one_thread_per_search()
    app = create_app(app_config(args))
    snapshot = app.extensions["retrieval"].warm_up()  # refuses a fingerprint mismatch before listening
    server = make_server(app, args.host, args.port, args.threads)
    upload = "on" if args.checkpoint else "off (no --checkpoint)"
    print(f"Serving {len(snapshot.store)} items from {args.index} on http://{args.host}:{server.effective_port}/ "
          f"(search by photo {upload}; Ctrl-C stops)", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        logger.info("Stopping")
    finally:
        server.close()
    return 0

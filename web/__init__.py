"""The search web UI and JSON API: a Flask app factory (flaskr style) with one blueprint per area."""
from __future__ import annotations

import os

from flask import Flask

DEFAULTS = {
    "INDEX_DIR": None,  # index directory written by `retrieval index build`
    "CATALOG_DIR": None,  # the catalog the images are served from
    "CHECKPOINT": None,  # RUN/best.pt for search by photo; None disables it
    "REPORT_DIR": None,  # `retrieval evaluate` output for the evaluation page
    "DEVICE": "cpu",
    "THUMB_DIR": None,  # default: <instance>/thumbs
    "THUMB_SIZE": 256,
    "MAX_CONTENT_LENGTH": 10 * 1000 * 1000,  # uploads over this get 413
    "UPLOAD_MAX_PIXELS": 25_000_000,  # decompression bombs beyond this get 400
    "INDEX_CHECK_INTERVAL": 1.0,  # seconds between os.stat checks for a rebuilt index
    "QUERY_CACHE_SIZE": 256,  # uploads remembered for re-filtering without the model
    "AUDIT_DIR": None,  # `retrieval audit` output for the label review page
    "REVIEW": False,  # whether review decisions may be written (serve --review)
}


PATHS = ("INDEX_DIR", "CATALOG_DIR", "CHECKPOINT", "REPORT_DIR", "THUMB_DIR", "AUDIT_DIR")


def resolve_paths(config) -> None:
    """Make the configured paths absolute against today's working directory: Flask would resolve a
    relative one against the package (send_from_directory), and a later chdir must change nothing."""
    for key in PATHS:
        if config.get(key):
            config[key] = os.path.abspath(os.path.expanduser(config[key]))  # no resolve(): keep symlinks


def create_app(test_config: dict | None = None) -> Flask:
    """Create the app from test_config, or from instance/config.py and FLASK_* environment variables."""
    app = Flask(__name__, instance_relative_config=True)
    app.config.from_mapping(DEFAULTS)
    if test_config is None:
        app.config.from_pyfile("config.py", silent=True)
        app.config.from_prefixed_env()
    else:
        app.config.from_mapping(test_config)
    if not app.config["THUMB_DIR"]:
        app.config["THUMB_DIR"] = os.path.join(app.instance_path, "thumbs")
    resolve_paths(app.config)

    from web import api, errors, evaluation, media, resources, review, security, views

    resources.init_app(app)
    errors.init_app(app)
    security.init_app(app)
    media.init_app(app)
    app.register_blueprint(views.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(evaluation.bp)
    app.register_blueprint(review.bp)
    app.add_template_filter(group_title, "group_title")
    return app


def group_title(name: str) -> str:
    """A group's name as a heading: underscores as spaces and the first letter upper case, the rest as
    written (Jinja's ``capitalize`` lower-cased it: 'Farbe/Größe' read 'Farbe/größe', 'baseColour' 'Basecolour')."""
    text = str(name).replace("_", " ")
    return text[:1].upper() + text[1:]

"""Error pages: JSON {"error": message} under /api, an HTML page elsewhere, never a stack trace."""
from __future__ import annotations

import logging

from flask import g, jsonify, make_response, render_template, request
from werkzeug.exceptions import HTTPException

logger = logging.getLogger(__name__)

HANDLED = (400, 403, 404, 405, 413, 500, 503)
MESSAGES = {
    404: "Not found.",
    405: "This method is not allowed here.",
    413: "The upload is too large.",
    500: "Something went wrong on our side; the error has been logged.",
}


def describe(error: HTTPException) -> str:
    """Return the message shown for an HTTP error (the abort reason, or a generic sentence)."""
    if error.code == 413:
        return f"The upload is too large; the limit is {max_upload_mb()} MB."
    if error.code == 500:
        return MESSAGES[500]  # Flask logs the exception; the client gets no trace
    default = type(error)(None).description  # werkzeug's stock text: replace it with ours
    if not error.description or error.description == default:
        return MESSAGES.get(error.code, error.name)
    return error.description


def max_upload_mb() -> str:
    """Return the configured upload limit in MB for messages."""
    from flask import current_app

    limit = current_app.config.get("MAX_CONTENT_LENGTH") or 0
    return f"{limit / 1e6:g}"


def wants_json() -> bool:
    """Return True for API routes, which always answer JSON."""
    return request.path == "/api" or request.path.startswith("/api/")


def handle_http_error(error: HTTPException):
    """Answer an HTTP error as JSON under /api, as an HTML page elsewhere, keeping its headers (405: Allow)."""
    message = describe(error)
    if wants_json():
        response = jsonify(error=message)
    else:
        response = make_response(render_template("error.html", code=error.code, title=error.name, message=message,
                                                 back=g.get("back")))
    for name, value in error.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response, error.code


def init_app(app) -> None:
    """Register the handlers for the status codes the app answers with."""
    for code in HANDLED:
        app.register_error_handler(code, handle_http_error)

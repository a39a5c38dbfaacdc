"""Response headers every answer carries: no MIME sniffing, and a strict Content-Security-Policy on pages."""
from __future__ import annotations

# The UI loads its own CSS and JS only (no CDN, no inline script or style, no frames), so every
# source but the server itself is refused; inline SVG and presentation attributes stay allowed.
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'", "script-src 'self'", "style-src 'self'", "img-src 'self'", "form-action 'self'",
    "base-uri 'none'", "frame-ancestors 'none'",
])


def add_security_headers(response):
    """Forbid MIME sniffing on every response; add the CSP to HTML pages."""
    response.headers["X-Content-Type-Options"] = "nosniff"
    if response.mimetype == "text/html":
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return response


def init_app(app) -> None:
    """Register the header hook (it also runs on error pages)."""
    app.after_request(add_security_headers)

"""The HTTP server's own answers, complete and closing (uvicorn's plain-text ones): 400 for
malformed HTTP, 431 for a head over the limit, 500 for an app that failed before it answered,
503 over `max_connections`."""

from __future__ import annotations

from vllmd.httpserver.exchange import STATUS_LINES


def _plain(status: int, text: str) -> bytes:
    """A complete answer of the server's own (uvicorn's plain-text ones), closing."""
    body = text.encode()
    return (
        STATUS_LINES[status]
        + b"content-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
        + b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )


BAD_REQUEST = _plain(400, "Invalid HTTP request received.")
HEAD_TOO_LARGE = _plain(431, "Request header fields too large.")
UNAVAILABLE = _plain(503, "Service Unavailable")
INTERNAL_ERROR = _plain(500, "Internal Server Error")

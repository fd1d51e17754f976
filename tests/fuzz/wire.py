"""Raw HTTP/1.1 on a byte stream, for the fuzz tests: a request is written as the bytes the
test made (no client library normalises its path or headers) and the first answer read back
as far as the property needs it: its status, headers and, when it has a length, its body."""

from __future__ import annotations

from dataclasses import dataclass

import anyio
from anyio.abc import ByteStream

# The HTTP server's own plain answers (vllmd/httpserver/plain.py), by status.
PLAIN_TEXTS = {
    400: b"Invalid HTTP request received.",
    431: b"Request header fields too large.",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}
MAX_ANSWER_HEAD = 128 * 1024


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # names lowercased; the last of a repeated one
    body: bytes | None  # None: not read (a HEAD answer, or one without a content-length)

    @property
    def plain(self) -> bool:
        """One of the HTTP server's own plain-text answers (an engine's plain 500, relayed,
        has the same text but not the server's framing); a HEAD's, whose body is not read,
        by its framing alone."""
        own = self.headers.get("connection") == "close" and "x-request-id" not in self.headers
        own = own and self.headers.get("content-type", "").startswith("text/plain")
        text = PLAIN_TEXTS.get(self.status)
        return own and text is not None and self.body in (None, text)


class NoAnswer(Exception):
    """The connection ended, or the time ran out, before a whole answer head came."""


async def exchange(
    stream: ByteStream, request: bytes, *, head_only: bool, eof: bool = False
) -> Answer:
    """Send `request` whole (the server may stop reading early), then read the first final
    answer: its head, and its body when it has a content-length (none for `head_only`).
    With `eof` the sending side is closed after it: a body promised and not sent ends
    there, not at the server's timeout."""
    try:
        await stream.send(request)
        if eof:
            await stream.send_eof()
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass  # the server answered and stopped reading: its answer may still be there
    buffer = b""
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            status, headers = _head(buffer[:end])
            buffer = buffer[end + 4 :]
            if 100 <= status < 200:
                continue  # 100 Continue: the final answer follows
            break
        if len(buffer) > MAX_ANSWER_HEAD:
            raise NoAnswer(f"an answer head over {MAX_ANSWER_HEAD} bytes")
        buffer += await _receive(stream, buffer)
    length = headers.get("content-length")
    if head_only or length is None or "chunked" in headers.get("transfer-encoding", ""):
        return Answer(status, headers, None)
    while len(buffer) < int(length):
        buffer += await _receive(stream, buffer)
    return Answer(status, headers, buffer[: int(length)])


async def _receive(stream: ByteStream, so_far: bytes) -> bytes:
    try:
        return await stream.receive(65536)
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        raise NoAnswer(f"the connection ended after {so_far[:200]!r}") from None


def _head(raw: bytes) -> tuple[int, dict[str, str]]:
    lines = raw.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    assert version in ("HTTP/1.1", "HTTP/1.0"), lines[0]
    status = int(rest[:3])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers

"""Upload limits, enforced while the request body arrives rather than after it is stored.

A declared Content-Length over the limit is refused before a byte is read; a body sent without
one (chunked) is counted as it streams and refused as soon as it passes the limit, so a client
can neither fill the disk with spooled uploads nor hold the server on one huge request.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_FILES = 16
MAX_FILE_BYTES = 16 * 2**20
MAX_BODY_BYTES = 64 * 2**20


def too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"request body over the {limit // 2**20} MiB limit: send fewer or smaller images")


class BodyLimit:
    """ASGI middleware: a 413 for any request body over ``limit`` bytes."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.limit:
            await JSONResponse({"error": too_large(self.limit).detail}, 413)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise too_large(self.limit)  # inside the route: answered by the app's error handler
            return message

        await self.app(scope, counted, send)

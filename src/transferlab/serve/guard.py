"""Who may ask: only this machine's names, and no other site's requests that change state or start work.

A web page on another site can make the user's browser send requests to the local server, and
with a name that resolves to 127.0.0.1 (DNS rebinding) even read the answers. So the app answers
only a ``Host`` of 127.0.0.1, localhost or [::1] (any port), or the address ``--host`` named
(any Host for 0.0.0.0 and ::, where the user chose to serve to the network and is warned); and it
refuses a POST whose ``Origin`` is not the server itself, and any request a browser marks as
coming from another site (``Sec-Fetch-Site: cross-site`` or ``same-site``, such as another port
of localhost), except a plain top-level GET of a page that starts no work (a link to a run's
page still opens; a review, which computes for seconds, does not).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

LOCAL = {"127.0.0.1", "localhost", "::1"}
EVERYWHERE = {"0.0.0.0", "::", ""}
WORK = re.compile(r"^(/api)?/runs/.+/review/?$")  # GET routes that compute; every POST does
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def hostname(host: str) -> str:
    """The name in a Host header, without its port: ``[::1]:8000`` -> ``::1``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


class Guard:
    """ASGI middleware: a one-line 400 for another Host, a 403 for another site's request (see the module)."""

    def __init__(self, app: ASGIApp, host: str = "127.0.0.1") -> None:
        self.app = app
        self.hosts = None if host in EVERYWHERE else LOCAL | {hostname(host)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        http = scope["type"] == "http"
        refusal = self.refusal(scope["method"], scope["path"], Headers(scope=scope)) if http else None
        if refusal:
            await JSONResponse({"error": refusal[1]}, refusal[0])(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def refusal(self, method: str, path: str, headers: Headers) -> tuple[int, str] | None:
        host = headers.get("host", "")
        if self.hosts is not None and hostname(host) not in self.hosts:
            return 400, (
                f"this server answers only as {' or '.join(sorted(self.hosts))}, not as Host {host[:100]!r}: "
                "open it at http://127.0.0.1:PORT/ (or serve with --host NAME)"
            )
        site = headers.get("sec-fetch-site", "")
        navigation = method == "GET" and headers.get("sec-fetch-mode") == "navigate"
        page = navigation and headers.get("sec-fetch-dest") == "document" and not WORK.match(path)
        if site in ("cross-site", "same-site") and not page:
            return 403, f"refused a {method} from another site ({site}): open {path[:100]} from this server's own pages"
        origin = headers.get("origin")
        if method not in SAFE_METHODS and origin is not None and urlsplit(origin).netloc.lower() != host.lower():
            return 403, f"refused a {method} from {origin[:100]!r}: only this server's own pages may send it"
        return None

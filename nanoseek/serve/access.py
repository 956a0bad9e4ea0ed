"""Who may use the server: the API key, the web chat's history token, and the checks on what a browser sends.

With an API key (`--api-key` or NANOSEEK_API_KEY) every endpoint but `/health` and the page needs `Authorization:
Bearer KEY`. Without one, `/v1` is open to whoever can connect, as vLLM's is (it stores nothing), but the web chat's
history (`/api`) is private: a loopback bind keeps other machines out, not other users of this one. So, as Jupyter
does, `/api` then needs a token, kept beside the history file in `<history>.token` (mode 0600, made once and reused,
so a browser that stored it keeps working; a fresh one per start for an in-memory history). `nanoseek serve` prints
it in the web chat's address, `http://127.0.0.1:PORT/#token=…`, and the page keeps it as its key.

`BrowserGuard` refuses what another site's page could make a browser send: a Host that is not a loopback name when
bound to loopback (DNS rebinding), and any write from a foreign Origin (cross-site request forgery).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
import secrets
from pathlib import Path

from fastapi import Request
from fastapi.responses import JSONResponse

from .history import HistoryError, make_private
from .schemas import ApiError, error_body

API_KEY_HINT = "invalid or missing API key: send 'Authorization: Bearer <key>'"
TOKEN_HINT = ("invalid or missing token: the web chat's history needs the token in the address that `nanoseek serve` "
              "printed (http://…/#token=…), sent as 'Authorization: Bearer <token>'")
TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")  # what an HTTP header carries


def bearer_checker(key: str | None, hint: str = API_KEY_HINT):
    """A dependency that lets a request through only with `Authorization: Bearer <key>` (if a key is set)."""
    expected = key.encode() if key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise ApiError(401, hint, code="invalid_api_key")

    return check


def new_token() -> str:
    return secrets.token_urlsafe(32)


def history_token(history_path: Path) -> str:
    """The token of the history at `history_path`: read from `<history>.token`, or made there (0600) the first time;
    a fresh one for ":memory:"."""
    if str(history_path) == ":memory:":
        return new_token()
    path = history_path.with_name(history_path.name + ".token")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # made by an earlier start
        make_private(path)
        token = path.read_text(errors="replace").strip()
        if not TOKEN_CHARS.fullmatch(token):
            raise HistoryError(f"{path} holds no token (printable ASCII, no spaces); delete it to have a new one made")
        return token
    token = new_token()
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    if header.startswith("["):  # [::1]:8000
        return header[1 : header.find("]")]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class BrowserGuard:
    """ASGI middleware. With loopback_only: refuse (400) a Host header that is not a loopback name, as a page
    elsewhere reaching the server through DNS rebinding sends. Always: refuse (403) a write (any method but GET and
    HEAD) that a browser says comes from another origin: by `Sec-Fetch-Site` (anything but same-origin, or none for
    what the user typed), which a reverse proxy that rewrites Host leaves true, or, from a browser too old to send it,
    by an Origin that is not the Host. FastAPI
    before 0.132 parsed even a body without Content-Type as JSON, which any page can post without a CORS preflight.
    Clients that are not browsers (curl, the openai package) send no Origin and pass."""

    def __init__(self, app, loopback_only: bool = True):
        self.app, self.loopback_only = app, loopback_only

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = self._refusal(dict(scope.get("headers") or []), scope["method"])
            if refusal is not None:
                status, message = refusal
                await JSONResponse(error_body(message), status_code=status)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, headers: dict, method: str) -> tuple[int, str] | None:
        host = headers.get(b"host", b"").decode("latin-1").lower()
        if self.loopback_only and host and not is_loopback(_host_name(host)):
            return 400, "this server only answers requests addressed to a loopback host"
        if method in ("GET", "HEAD"):
            return None
        fetch_site = headers.get(b"sec-fetch-site")
        if fetch_site is not None:  # what the browser itself says; right behind a proxy that rewrites Host
            foreign = fetch_site not in (b"same-origin", b"none")  # same-site: another port of this host, too
        else:  # an older browser: its Origin against the Host it addressed
            origin = headers.get(b"origin", b"").decode("latin-1").lower()
            foreign = bool(origin) and origin not in (f"http://{host}", f"https://{host}")
        if foreign:
            return 403, "this server refuses writes from another site's page (its Origin is not this server's)"
        return None

"""Who may talk to podfsm over TCP: a token, the listening names, the page's origin.

The unix socket needs none of this: who may connect to it is its file mode (0660, root). TCP
can be reached by anything that runs on the machine (and beyond it, with `--host`), including
web pages in a browser, so every TCP request:

- names one of the listening names in `Host` (else 403): a DNS-rebinding page's requests carry
  its own name;
- carries the token, as `Authorization: Bearer TOKEN` or as the cookie the web page got (else
  401), except the page itself, /healthz and /openapi.json, which say nothing of the pods;
- when it changes state (anything but GET and HEAD), comes from the page's own origin when it
  says where it comes from (`Origin`), and must say so when it is authenticated by the cookie
  (else 403).

`GET /?token=TOKEN` (the URL `serve` prints) answers with a redirect to `/` that sets the
cookie, HttpOnly and SameSite=Strict: the page's script never sees the token, and no other
site's page can make the browser send it.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from urllib.parse import parse_qs

from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Receive, Scope, Send

from podfsm.faces.http.errors import DaemonError, Forbidden, Unauthorized

#: served without a token: the page (static), liveness, the document
PUBLIC = frozenset({"/", "/healthz", "/openapi.json"})
_SAFE = frozenset({"GET", "HEAD"})


def cookie_name(port: int) -> str:
    """The page's cookie: one per port, as cookies are per host and not per port."""
    return f"podfsm_token_{port}"


class TcpGuard:
    """The checks of a TCP request (see the module's note), before the application."""

    def __init__(self, token: str, names: frozenset[str], port: int) -> None:
        self._token = token.encode()
        self.names = names
        self.port = port
        self.cookie = cookie_name(port)

    def _valid(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self._token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send, app: ASGIApp) -> None:
        headers = Headers(scope=scope)
        host = headers.get("host", "").lower()
        if host not in self.names:
            raise Forbidden(f"Host {host!r} is not one of the names podfsm listens on")
        path, method = scope["path"], scope["method"]
        if path == "/" and method in _SAFE:
            tokens = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
            if tokens:
                await self._set_cookie(tokens[0], send)
                return
        if path in PUBLIC and method in _SAFE:
            await app(scope, receive, send)
            return
        scheme, _, bearer = headers.get("authorization", "").partition(" ")
        by_bearer = scheme.lower() == "bearer" and self._valid(bearer.strip())
        by_cookie = self._valid(cookie_parser(headers.get("cookie", "")).get(self.cookie))
        if not (by_bearer or by_cookie):
            raise Unauthorized("a token is needed on TCP: send `Authorization: Bearer TOKEN` "
                               "(the token is in serve's --token-file), or open the URL "
                               "`podfsm serve` printed")
        if method not in _SAFE:
            origin = headers.get("origin")
            if origin is not None and origin.lower() != f"http://{host}":
                raise Forbidden(f"Origin {origin!r} may not change anything here")
            if origin is None and not by_bearer:
                raise Forbidden("a request that changes state with the page's cookie must "
                                "carry Origin")
        await app(scope, receive, send)

    async def _set_cookie(self, given: str, send: Send) -> None:
        if not self._valid(given):
            raise Unauthorized("the token in the URL is not podfsm's token")
        cookie = (f"{self.cookie}={self._token.decode()}; Path=/; HttpOnly; "
                  "SameSite=Strict").encode()
        await send({"type": "http.response.start", "status": 303, "headers": [
            (b"location", b"/"), (b"set-cookie", cookie), (b"cache-control", b"no-store"),
            (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})


def load_or_create_token(path: str) -> str:
    """The token kept in `path`: created (mode 0600, a random token) when missing; refused
    when it is not a regular file of ours that only we can read."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o755, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise DaemonError(f"cannot create the token file {path}: {exc.strerror}") from None
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise DaemonError(f"cannot read the token file {path}: {exc.strerror}") from None
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise DaemonError(f"the token file {path} is not a regular file")
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise DaemonError(f"the token file {path} must be ours and mode 0600 "
                              f"(it is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})")
        token = f.read(4096).strip()
    if len(token) < 16 or not token.isascii() or not token.isprintable() or " " in token:
        raise DaemonError(f"the token in {path} must be at least 16 printable ASCII "
                          "characters without spaces")
    return token


def listening_names(host: str, port: int) -> frozenset[str]:
    """The Host values a TCP listener on host:port answers to."""
    loopback = {"localhost", "127.0.0.1", "[::1]"}
    shown = f"[{host}]" if ":" in host else host
    names = {shown.lower()}
    if host in ("localhost", "127.0.0.1", "::1"):
        names |= loopback
    elif host in ("0.0.0.0", "::", ""):
        import socket

        hostname = socket.gethostname()
        names |= loopback | {hostname.lower(), socket.getfqdn().lower()}
        try:
            infos = socket.getaddrinfo(hostname, None, type=socket.SOCK_STREAM)
        except OSError:
            infos = []
        for info in infos:
            addr = str(info[4][0])
            names.add(f"[{addr}]" if ":" in addr else addr)
    with_port = {f"{n}:{port}" for n in names}
    return frozenset(with_port | (names if port == 80 else set()))

"""containerd's `certs.d/<host>/hosts.toml` as a list of endpoints to try in order (pure: the
driver reads the file, this parses its text).

    server = "https://registry.k8s.io"          # the upstream, tried last (default: the host)

    [host."http://127.0.0.1:5000"]              # mirrors, tried in the file's order
      capabilities = ["pull", "resolve"]        # resolve: may map a tag to a digest
      skip_verify = false
      ca = "ca.crt"                             # or a list; relative to the hosts.toml's dir
      client = [["client.crt", "client.key"]]   # or "both.pem", or a list of those
      override_path = false                     # true: the URL's path is the API root
      [host."http://127.0.0.1:5000".header]
        x-custom = "value"                      # or a list of values

The top level may carry the same keys (capabilities, skip_verify, ca, client, header,
override_path) for the `server`. A URL without a scheme is https; `http://` is plain HTTP.
"""

from __future__ import annotations

import base64
import os
import re
import tomllib
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from podfsm.core.errors import InvalidPullRequest
from podfsm.core.imageref import DOCKER_HUB, DOCKER_HUB_API

#: what a token may hold: it goes into an HTTP header or form as it is
TOKEN = re.compile(r"[\x21-\x7e]*")
CAPABILITIES = frozenset({"pull", "resolve", "push"})
DEFAULT_CAPABILITIES = ("pull", "resolve", "push")
_KEYS = {"server", "capabilities", "skip_verify", "ca", "client", "header", "override_path",
         "host"}
_HOST_KEYS = _KEYS - {"server", "host"}


class HostsConfigError(ValueError):
    """A hosts.toml that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Endpoint:
    """One place to fetch from: `api` is the API root (…/v2) that `<name>/manifests/<ref>` and
    `<name>/blobs/<digest>` are appended to."""

    api: str
    capabilities: tuple[str, ...] = DEFAULT_CAPABILITIES
    skip_verify: bool = False
    ca: tuple[str, ...] = ()
    client: tuple[tuple[str, str], ...] = ()  # (cert, key); key "" when the cert holds it
    headers: tuple[tuple[str, str], ...] = ()
    mirror: bool = False  # not the upstream itself (then `?ns=<host>` tells which it mirrors)
    source: str = ""  # the hosts.toml it came from ("" for the built-in default)

    @property
    def plain_http(self) -> bool:
        return self.api.startswith("http://")

    @property
    def authority(self) -> str:
        """host[:port] of the endpoint (tokens are cached per authority)."""
        return urlsplit(self.api).netloc

    def can(self, capability: str) -> bool:
        return capability in self.capabilities


def _is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return name in ("localhost", "[::1]") or name.startswith("127.")


def default_endpoint(host: str) -> Endpoint:
    """The registry's own API when no hosts.toml says otherwise: https, Docker Hub's API host for
    docker.io, plain HTTP for a loopback host (containerd falls back to it there too)."""
    if host == DOCKER_HUB:
        return Endpoint(api=f"https://{DOCKER_HUB_API}/v2")
    scheme = "http" if _is_loopback(host) else "https"
    return Endpoint(api=f"{scheme}://{host}/v2")


def _api_root(url: str, override_path: bool, where: str) -> str:
    if "://" not in url:
        url = "https://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise HostsConfigError(f"{where}: {url!r} is not an http(s) URL")
    path = parts.path.rstrip("/")
    if not override_path and not path.endswith("/v2"):
        path += "/v2"
    return f"{parts.scheme}://{parts.netloc}{path}"


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise HostsConfigError(f"{where}: expected a string or a list of strings")


def _path(p: str, base_dir: str) -> str:
    return p if os.path.isabs(p) else os.path.join(base_dir, p)


def _clients(value: Any, where: str, base_dir: str) -> tuple[tuple[str, str], ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise HostsConfigError(f"{where}: client must be a path, a [cert, key] pair or a list")
    if len(items) == 2 and all(isinstance(i, str) for i in items) and isinstance(value, list) \
            and items[1].endswith(".key"):
        items = [items]  # ["cert", "key"]: one pair
    out = []
    for item in items:
        if isinstance(item, str):
            out.append((_path(item, base_dir), ""))
        elif (isinstance(item, list) and len(item) == 2
              and all(isinstance(i, str) for i in item)):
            out.append((_path(item[0], base_dir), _path(item[1], base_dir)))
        else:
            raise HostsConfigError(f"{where}: client entry {item!r} is not a path or a pair")
    return tuple(out)


def _headers(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise HostsConfigError(f"{where}: header must be a table")
    return tuple((str(k), v) for k, vals in value.items() for v in _strings(vals, f"{where}.{k}"))


def _endpoint(url: str, table: dict[str, Any], where: str, base_dir: str, *,
              mirror: bool, source: str) -> Endpoint:
    unknown = set(table) - _HOST_KEYS - ({"server", "host"} if not mirror else set())
    if unknown:
        raise HostsConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    caps = _strings(table.get("capabilities", list(DEFAULT_CAPABILITIES)),
                    f"{where}.capabilities")
    bad = set(caps) - CAPABILITIES
    if bad:
        raise HostsConfigError(f"{where}.capabilities: unknown {', '.join(sorted(bad))} "
                               "(pull, resolve, push)")
    skip = table.get("skip_verify", False)
    override = table.get("override_path", False)
    for key, val in (("skip_verify", skip), ("override_path", override)):
        if not isinstance(val, bool):
            raise HostsConfigError(f"{where}.{key}: expected true or false")
    return Endpoint(
        api=_api_root(url, override, where), capabilities=caps, skip_verify=skip,
        ca=tuple(_path(p, base_dir) for p in _strings(table.get("ca", []), f"{where}.ca")),
        client=_clients(table.get("client", []), f"{where}.client", base_dir),
        headers=_headers(table.get("header", {}), f"{where}.header"),
        mirror=mirror, source=source)


def parse_hosts(text: str, host: str, path: str) -> list[Endpoint]:
    """The endpoints of `host` configured by hosts.toml `text` (read from `path`): each
    [host."URL"] in order, then the `server` (default: the registry itself)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise HostsConfigError(f"{path}: not TOML: {exc}") from None
    base_dir = os.path.dirname(path)
    unknown = set(doc) - _KEYS
    if unknown:
        raise HostsConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
    hosts = doc.get("host", {})
    if not isinstance(hosts, dict):
        raise HostsConfigError(f'{path}: host must be tables [host."URL"]')
    out = []
    for url, table in hosts.items():
        if not isinstance(table, dict):
            raise HostsConfigError(f'{path}: host."{url}" must be a table')
        out.append(_endpoint(url, table, f'{path}: host."{url}"', base_dir, mirror=True,
                             source=path))
    server = doc.get("server")
    if server is None:
        upstream = default_endpoint(host)
        top = {k: v for k, v in doc.items() if k not in ("host", "server")}
        if top:
            upstream = _endpoint(upstream.api, top | {"override_path": True}, path, base_dir,
                                 mirror=False, source=path)
        out.append(upstream)
    elif not isinstance(server, str):
        raise HostsConfigError(f"{path}: server must be a URL string")
    else:
        top = {k: v for k, v in doc.items() if k not in ("host", "server")}
        out.append(_endpoint(server, top, path, base_dir, mirror=False, source=path))
    return out


@dataclass(frozen=True)
class RegistryAuth:
    """Credentials for one pull (the CRI AuthConfig, decoded)."""

    username: str = ""
    password: str = ""
    identity_token: str = ""
    registry_token: str = ""

    @property
    def empty(self) -> bool:
        return not (self.username or self.password or self.identity_token
                    or self.registry_token)


def auth_from_cri(username: str = "", password: str = "", auth: str = "",
                  identity_token: str = "", registry_token: str = "") -> RegistryAuth:
    """A CRI AuthConfig as RegistryAuth: `auth` is base64 of `user:password` (as in a docker
    config.json), used when username/password are not given."""
    if auth and not username:
        try:
            text = base64.b64decode(auth, validate=True).decode(errors="replace")
        except ValueError:
            raise InvalidPullRequest("auth config: `auth` is not base64 of user:password"
                                     ) from None
        username, _, password = text.partition(":")
    for name, token in (("identity_token", identity_token), ("registry_token", registry_token)):
        if not TOKEN.fullmatch(token):
            raise InvalidPullRequest(f"auth config: {name} is not printable ASCII")
    return RegistryAuth(username, password, identity_token, registry_token)

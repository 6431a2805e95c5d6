"""The registry client: OCI distribution (Docker Registry HTTP API v2) over httpx.

Endpoints come from containerd-style `<config dir>/<host>/hosts.toml` (core.registryhosts):
each mirror in order, then the upstream. A manifest by tag is asked only of endpoints that may
`resolve`; a blob or a manifest by digest of those that may `pull`. An endpoint that fails
(connection, 404, 5xx, a refused credential) passes the request on to the next; content that
does not match its digest fails the pull at once, naming the digest.

Auth follows the distribution spec: a 401 with `WWW-Authenticate: Bearer realm=..,service=..,
scope=..` is answered by fetching a token from the realm (with the caller's basic credentials
when it has some, or an OAuth2 refresh-token POST for an identity token), cached per endpoint
and scope; `Basic` challenges get the caller's username and password; a registry token from
the CRI AuthConfig is sent as the bearer token directly.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import ssl
from collections.abc import Callable

import httpx

from podfsm.core.errors import ImageNotInRegistry, ImagePullError
from podfsm.core.imageref import ImageReference, registry_host_dirs
from podfsm.core.imagespec import MANIFEST_ACCEPT, MAX_DOCUMENT_BYTES, Descriptor
from podfsm.core.registryhosts import (
    Endpoint,
    HostsConfigError,
    RegistryAuth,
    default_endpoint,
    parse_hosts,
)
from podfsm.drivers.imagestore import check_document

log = logging.getLogger(__name__)

USER_AGENT = "podfsm/0.1"
CHUNK = 1 << 20
_PARAM = re.compile(r'([A-Za-z_]+)="((?:[^"\\]|\\.)*)"|([A-Za-z_]+)=([^,\s]+)')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """(scheme, params) of a WWW-Authenticate header, scheme lower-cased."""
    scheme, _, rest = header.strip().partition(" ")
    params = {}
    for m in _PARAM.finditer(rest):
        if m[1]:
            params[m[1].lower()] = m[2].replace('\\"', '"')
        else:
            params[m[3].lower()] = m[4]
    return scheme.lower(), params


class _Refused(Exception):
    """This endpoint cannot serve the request; the next one may. `status`: its HTTP answer,
    when it gave one."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class Registry:
    """Fetches manifests and blobs for the controller (one instance per controller)."""

    def __init__(self, config_dir: str, timeout: float = 30.0) -> None:
        self.config_dir = config_dir
        self.timeout = timeout
        self._clients: dict[tuple[bool, tuple[str, ...], tuple[tuple[str, str], ...]],
                            httpx.AsyncClient] = {}
        self._tokens: dict[tuple[str, str, RegistryAuth], str] = {}

    async def aclose(self) -> None:
        clients, self._clients = self._clients, {}
        for c in clients.values():
            await c.aclose()

    def endpoints(self, host: str) -> list[Endpoint]:
        """The endpoints for registry `host`: from the first of `<dir>/<host_port_>/`,
        `<dir>/<host>/`, `<dir>/_default/` holding a hosts.toml, else the registry itself."""
        for name in registry_host_dirs(host):
            path = os.path.join(self.config_dir, name, "hosts.toml")
            try:
                with open(path) as f:
                    text = f.read()
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                raise ImagePullError(f"cannot read {path}: {exc}") from None
            try:
                return parse_hosts(text, host, path)
            except HostsConfigError as exc:
                raise ImagePullError(f"registry config: {exc}") from None
        return [default_endpoint(host)]

    def _client(self, ep: Endpoint) -> httpx.AsyncClient:
        key = (ep.skip_verify, ep.ca, ep.client)
        client = self._clients.get(key)
        if client is None:
            verify: ssl.SSLContext | bool = True
            if ep.skip_verify:
                verify = False
            else:
                ctx = ssl.create_default_context()
                for ca in ep.ca:
                    ctx.load_verify_locations(cafile=ca)
                for cert, keyfile in ep.client:
                    ctx.load_cert_chain(cert, keyfile or None)
                verify = ctx
            client = httpx.AsyncClient(verify=verify, follow_redirects=True,
                                       timeout=httpx.Timeout(self.timeout),
                                       headers={"User-Agent": USER_AGENT})
            self._clients[key] = client
        return client

    async def _send(self, ep: Endpoint, method: str, url: str, repo: str, auth: RegistryAuth,
                    accept: str | None) -> httpx.Response:
        """Send with the endpoint's headers and auth; answer one 401 challenge. Returns a
        streaming response (the caller closes it)."""
        client = self._client(ep)
        headers = dict(ep.headers)
        if accept:
            headers["Accept"] = accept
        scope = f"repository:{repo}:pull"
        token = auth.registry_token or self._tokens.get((ep.authority, scope, auth))
        if token:
            headers["Authorization"] = f"Bearer {token}"
        resp = await client.send(client.build_request(method, url, headers=headers),
                                 stream=True)
        if resp.status_code != 401 or auth.registry_token:
            return resp
        await resp.aclose()
        scheme, params = parse_challenge(resp.headers.get("www-authenticate", ""))
        if scheme == "bearer" and params.get("realm"):
            token = await self._fetch_token(ep, params, scope, auth)
            self._tokens[(ep.authority, scope, auth)] = token
            headers["Authorization"] = f"Bearer {token}"
        elif scheme == "basic" and auth.username:
            cred = base64.b64encode(f"{auth.username}:{auth.password}".encode()).decode()
            headers["Authorization"] = f"Basic {cred}"
        else:
            raise _Refused(f"{url}: 401 unauthorized"
                           + ("" if not auth.empty else " (no credentials given)"))
        resp = await client.send(client.build_request(method, url, headers=headers),
                                 stream=True)
        if resp.status_code == 401:
            await resp.aclose()
            raise _Refused(f"{url}: 401 unauthorized: the registry refused the credentials")
        return resp

    async def _fetch_token(self, ep: Endpoint, params: dict[str, str], scope: str,
                           auth: RegistryAuth) -> str:
        client = self._client(ep)
        realm = params["realm"]
        query = {"service": params.get("service", ""), "scope": params.get("scope", scope)}
        query = {k: v for k, v in query.items() if v}
        try:
            if auth.identity_token:
                resp = await client.post(realm, data={
                    "grant_type": "refresh_token", "refresh_token": auth.identity_token,
                    "client_id": "podfsm", **query})
            else:
                basic = (auth.username, auth.password) if auth.username else None
                resp = await client.get(realm, params=query, auth=basic)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise _Refused(f"token server {realm}: {exc}") from None
        if resp.status_code != 200:
            raise _Refused(f"token server {realm}: HTTP {resp.status_code}")
        try:
            body = resp.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise _Refused(f"token server {realm}: no token in its answer")
        return token

    async def _document(self, ep: Endpoint, ref: ImageReference, what: str,
                        auth: RegistryAuth) -> tuple[bytes, str, str]:
        """(body, content type, Docker-Content-Digest) of manifests/<what> at `ep`."""
        url = f"{ep.api}/{ref.path}/manifests/{what}"
        try:
            resp = await self._send(ep, "GET", url, ref.path, auth, MANIFEST_ACCEPT)
            try:
                if resp.status_code != 200:
                    text = _error_text(await _small(resp))
                    raise _Refused(f"{url}: HTTP {resp.status_code} {text}", resp.status_code)
                body = await _small(resp)
            finally:
                await resp.aclose()
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise _Refused(f"{url}: {type(exc).__name__}: {exc}") from None
        return (body, resp.headers.get("content-type", ""),
                resp.headers.get("docker-content-digest", ""))

    async def resolve(self, ref: ImageReference, auth: RegistryAuth,
                      ) -> tuple[bytes, str, str, Endpoint]:
        """The top manifest (or index) of `ref`: (body, content type, digest, endpoint).
        By tag, the digest is the body's sha256 (a registry's Docker-Content-Digest header must
        agree); by digest, the body is verified against it."""
        eps = [e for e in self.endpoints(ref.api_host) if e.can("resolve")]
        if not eps:
            raise ImagePullError(f"no endpoint of {ref.domain} may resolve (capabilities)")
        failures: list[_Refused] = []
        for ep in eps:
            try:
                body, ctype, header = await self._document(ep, ref, ref.pull_ref, auth)
            except _Refused as exc:
                failures.append(exc)
                continue
            digest = ref.digest or header or _sha(body)
            check_document(digest, None, body)
            return body, ctype, digest, ep
        error = (ImageNotInRegistry if all(f.status == 404 for f in failures)
                 else ImagePullError)
        raise error(f"pulling {ref}: " + "; ".join(map(str, failures)))

    async def fetch_manifest(self, ref: ImageReference, desc: Descriptor, first: Endpoint,
                             auth: RegistryAuth) -> tuple[bytes, str]:
        """A manifest named by an index entry, verified against the entry."""
        failures = []
        for ep in self._pull_order(ref, first):
            try:
                body, ctype, _ = await self._document(ep, ref, desc.digest, auth)
            except _Refused as exc:
                failures.append(str(exc))
                continue
            check_document(desc.digest, desc.size, body)
            return body, ctype
        raise ImagePullError(f"manifest {desc.digest} of {ref}: " + "; ".join(failures))

    def _pull_order(self, ref: ImageReference, first: Endpoint) -> list[Endpoint]:
        eps = [e for e in self.endpoints(ref.api_host) if e.can("pull")]
        return sorted(eps, key=lambda e: e != first)  # the resolving endpoint first

    async def fetch_blob(self, ref: ImageReference, desc: Descriptor, first: Endpoint,
                         auth: RegistryAuth, write: Callable[[bytes], None],
                         reset: Callable[[], None],
                         progress: Callable[[int], None] | None = None) -> None:
        """Stream blob `desc` into `write` (the store's ingest, which checks size and digest);
        `reset` before another endpoint is tried."""
        failures = []
        for ep in self._pull_order(ref, first):
            url = f"{ep.api}/{ref.path}/blobs/{desc.digest}"
            reset()
            try:
                resp = await self._send(ep, "GET", url, ref.path, auth, None)
                try:
                    if resp.status_code != 200:
                        raise _Refused(f"{url}: HTTP {resp.status_code} "
                                       f"{_error_text(await _small(resp))}")
                    async for chunk in resp.aiter_bytes(CHUNK):
                        write(chunk)
                        if progress is not None:
                            progress(len(chunk))
                finally:
                    await resp.aclose()
            except _Refused as exc:
                failures.append(str(exc))
                continue
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                failures.append(f"{url}: {type(exc).__name__}: {exc}")
                continue
            return
        raise ImagePullError(f"blob {desc.digest} of {ref}: " + "; ".join(failures))


def _sha(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


async def _small(resp: httpx.Response) -> bytes:
    """The body of a response that must be small (a manifest, an error)."""
    out = bytearray()
    async for chunk in resp.aiter_bytes():
        out += chunk
        if len(out) > MAX_DOCUMENT_BYTES:
            raise _Refused(f"{resp.url}: answer larger than {MAX_DOCUMENT_BYTES} bytes")
    return bytes(out)


def _error_text(body: bytes) -> str:
    """The registry's error code and message (`{"errors": [{"code", "message"}]}`)."""
    try:
        errs = json.loads(body)["errors"]
        return "; ".join(f"{e.get('code', '')} {e.get('message', '')}".strip() for e in errs)
    except (ValueError, KeyError, TypeError, AttributeError):
        return body[:200].decode(errors="replace").strip()

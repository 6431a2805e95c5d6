"""A registry with distribution's `token` auth and a small token server beside it, on
127.0.0.1: the server checks HTTP basic credentials and answers with a JWT (RS256, signed with
`openssl dgst`, its certificate in the `x5c` header) that the registry trusts through its
`rootcertbundle`."""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from tests import imagekit as ik

SERVICE = "podfsm-test-registry"
ISSUER = "podfsm-test-issuer"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Tokens:
    key: Path
    cert_der: bytes
    scopes: list[str] = field(default_factory=list)
    issued: int = 0

    def mint(self, repo: str, actions: list[str]) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self.cert_der).decode()]}
        claims = {"iss": ISSUER, "sub": "alice", "aud": SERVICE, "exp": now + 600,
                  "nbf": now - 60, "iat": now, "jti": str(now),
                  "access": [{"type": "repository", "name": repo, "actions": actions}]}
        signing = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)],
                             input=signing.encode(), capture_output=True, check=True).stdout
        return f"{signing}.{_b64(sig)}"


@contextlib.contextmanager
def token_registry(tmp: Path, users: dict[str, str]) -> Iterator[tuple[ik.Registry, Tokens]]:
    tmp.mkdir(parents=True, exist_ok=True)
    key, cert = tmp / "token.key", tmp / "token.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=podfsm-token"],
                   capture_output=True, check=True)
    der = subprocess.run(["openssl", "x509", "-in", str(cert), "-outform", "DER"],
                         capture_output=True, check=True).stdout
    tokens = Tokens(key, der)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            q = parse_qs(urlsplit(self.path).query)
            cred = self.headers.get("Authorization", "")
            ok = False
            if cred.startswith("Basic "):
                user, _, pw = base64.b64decode(cred[6:]).decode().partition(":")
                ok = users.get(user) == pw
            if not ok or q.get("service") != [SERVICE]:
                self.send_response(401)
                self.end_headers()
                return
            scope = q.get("scope", [""])[0]
            tokens.scopes.append(scope)
            tokens.issued += 1
            _, repo, actions = scope.split(":")
            body = json.dumps({"token": tokens.mint(repo, actions.split(","))}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        auth = {"token": {"realm": f"http://127.0.0.1:{server.server_port}/token",
                          "service": SERVICE, "issuer": ISSUER,
                          "rootcertbundle": str(cert)}}
        with ik.run_registry(auth=auth) as reg:
            reg.auth_headers = {"Authorization": "Bearer " + tokens.mint(
                "private/app", ["pull", "push"])}
            yield reg, tokens
    finally:
        server.shutdown()
        server.server_close()
        thread.join()

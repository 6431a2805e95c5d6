"""A registry that has every repository and tag: each name's manifest is the same small image
(one layer with one file). schemathesis' generated pulls reach it through a `_default`
hosts.toml, so that a valid reference is pulled (201) and the stateful phase can follow the
pull's links; a manifest asked for by another digest is unknown (404), as a real registry
answers."""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests import imagekit as ik

_PATH = re.compile(r"^/v2/(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<ref>[^/]+)$")


@contextlib.contextmanager
def any_registry(config_dir: Path) -> Iterator[ik.Image]:
    """Serve on a free port of 127.0.0.1 and write `config_dir/_default/hosts.toml` sending
    every host there; the image it serves."""
    img = ik.build_image([ik.make_layer([ik.Entry("hello", data=b"hello\n")])], label="any")
    blobs = {img.id: img.config, **{la.digest: la.blob for la in img.layers}}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            if status == 200 and ctype == img.manifest_type:
                self.send_header("Docker-Content-Digest", img.digest)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:
            m = _PATH.match(self.path.split("?")[0])
            unknown = b'{"errors": [{"code": "MANIFEST_UNKNOWN", "message": "unknown"}]}'
            if m is None:
                self._send(404, b'{"errors": []}')
            elif m["kind"] == "manifests":
                ref = m["ref"]
                if ref.startswith("sha256:") and ref != img.digest:
                    self._send(404, unknown)
                else:
                    self._send(200, img.manifest, img.manifest_type)
            elif m["ref"] in blobs:
                self._send(200, blobs[m["ref"]], "application/octet-stream")
            else:
                self._send(404, b'{"errors": [{"code": "BLOB_UNKNOWN", "message": "unknown"}]}')

        do_HEAD = do_GET

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        ik.hosts_toml(str(config_dir), "_default", f"http://127.0.0.1:{server.server_port}")
        yield img
    finally:
        server.shutdown()
        server.server_close()
        thread.join()

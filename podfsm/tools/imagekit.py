"""Images built with the standard library from Debian's busybox-static, and a real registry
(Debian's docker-registry, distribution 2.8) on 127.0.0.1 to push them to: for the tests
(tests/imagekit.py re-exports this module) and `podfsm bench --pull`.

Layers are tar (mtime 0, owners root) gzipped with mtime 0, so digests are reproducible.
`Registry.push_image` pushes blobs (POST uploads/, PUT ?digest=) and manifests (PUT with their
Content-Type) over plain HTTP, as `docker push` would.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

BUSYBOX = "/bin/busybox"
REGISTRY_BIN = "/usr/bin/docker-registry"

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Entry:
    """One tar member: kind file/dir/symlink/hardlink; `data` for files, `target` for links."""

    name: str
    kind: str = "file"
    data: bytes = b""
    mode: int = 0o644
    target: str = ""
    uid: int = 0
    gid: int = 0


@dataclass
class Layer:
    tar: bytes
    blob: bytes  # gzip of tar

    @property
    def diff_id(self) -> str:
        return sha(self.tar)

    @property
    def digest(self) -> str:
        return sha(self.blob)


def make_layer(entries: Sequence[Entry]) -> Layer:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            ti = tarfile.TarInfo(e.name)
            ti.mtime, ti.uid, ti.gid, ti.mode = 0, e.uid, e.gid, e.mode
            if e.kind == "dir":
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            elif e.kind == "symlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, e.target
                tf.addfile(ti)
            elif e.kind == "hardlink":
                ti.type, ti.linkname = tarfile.LNKTYPE, e.target
                tf.addfile(ti)
            else:
                ti.size = len(e.data)
                tf.addfile(ti, io.BytesIO(e.data))
    tar = buf.getvalue()
    return Layer(tar=tar, blob=gzip.compress(tar, mtime=0))


def busybox_layer(applets: Sequence[str] = ("sh", "ls", "cat", "echo", "sleep", "id")) -> Layer:
    with open(BUSYBOX, "rb") as f:
        data = f.read()
    entries = [Entry("bin", "dir", mode=0o755), Entry("bin/busybox", data=data, mode=0o755)]
    entries += [Entry(f"bin/{a}", "symlink", target="busybox", mode=0o777) for a in applets]
    entries += [Entry("etc", "dir", mode=0o755),
                Entry("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n"
                      b"www-data:x:33:33:www-data:/var/www:/bin/sh\n"),
                Entry("etc/group", data=b"root:x:0:\nwww-data:x:33:\n")]
    return make_layer(entries)


@dataclass
class Image:
    """A built image: its layers, config and manifest (of one kind)."""

    layers: list[Layer]
    config: bytes
    manifest: bytes
    manifest_type: str

    @property
    def id(self) -> str:
        return sha(self.config)

    @property
    def digest(self) -> str:
        return sha(self.manifest)


def build_image(layers: Sequence[Layer], *, oci: bool = False, user: str = "",
                arch: str = "amd64", variant: str = "", label: str = "",
                cmd: Sequence[str] = ("/bin/sh",)) -> Image:
    config: dict[str, Any] = {
        "architecture": arch, "os": "linux",
        "config": {"User": user, "Cmd": list(cmd), "Env": ["PATH=/bin"],
                   "Labels": {"podfsm.test": label} if label else None},
        "rootfs": {"type": "layers", "diff_ids": [la.diff_id for la in layers]},
        "created": "1970-01-01T00:00:00Z",
    }
    if variant:
        config["variant"] = variant
    cbytes = json.dumps(config, sort_keys=True).encode()
    ltype, ctype, mtype = ((OCI_LAYER, OCI_CONFIG, OCI_MANIFEST) if oci
                           else (DOCKER_LAYER, DOCKER_CONFIG, DOCKER_MANIFEST))
    manifest = {
        "schemaVersion": 2, "mediaType": mtype,
        "config": {"mediaType": ctype, "digest": sha(cbytes), "size": len(cbytes)},
        "layers": [{"mediaType": ltype, "digest": la.digest, "size": len(la.blob)}
                   for la in layers],
    }
    return Image(list(layers), cbytes, json.dumps(manifest).encode(), mtype)


def build_index(images: Sequence[tuple[Image, str]], *, oci: bool = False) -> bytes:
    """An index (OCI) or manifest list (Docker) of (image, "os/arch[/variant]") entries."""
    entries = []
    for img, plat in images:
        parts = plat.split("/")
        p = {"os": parts[0], "architecture": parts[1]}
        if len(parts) > 2:
            p["variant"] = parts[2]
        entries.append({"mediaType": img.manifest_type, "digest": img.digest,
                        "size": len(img.manifest), "platform": p})
    mtype = OCI_INDEX if oci else DOCKER_LIST
    return json.dumps({"schemaVersion": 2, "mediaType": mtype, "manifests": entries}).encode()


def _expect(resp: httpx.Response, status: int, what: str) -> None:
    if resp.status_code != status:
        raise RuntimeError(f"registry: {what}: HTTP {resp.status_code} (expected {status}): "
                           f"{resp.text[:500]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Registry:
    """A docker-registry process serving `root` on 127.0.0.1:`port`."""

    root: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: str
    auth_headers: dict[str, str] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.auth_headers, timeout=30)

    def push_blob(self, repo: str, data: bytes) -> str:
        digest = sha(data)
        with self.client() as c:
            if c.head(f"/v2/{repo}/blobs/{digest}").status_code == 200:
                return digest
            r = c.post(f"/v2/{repo}/blobs/uploads/")
            _expect(r, 202, f"upload of {digest}")
            loc = r.headers["location"]
            sep = "&" if "?" in loc else "?"
            r = c.put(f"{loc}{sep}digest={digest}", content=data,
                      headers={"Content-Type": "application/octet-stream"})
            _expect(r, 201, f"upload of {digest}")
        return digest

    def put_manifest(self, repo: str, ref: str, data: bytes, media_type: str) -> str:
        with self.client() as c:
            r = c.put(f"/v2/{repo}/manifests/{ref}", content=data,
                      headers={"Content-Type": media_type})
            _expect(r, 201, f"manifest {repo}:{ref}")
        return sha(data)

    def push_image(self, repo: str, img: Image, tag: str | None = None) -> str:
        for la in img.layers:
            self.push_blob(repo, la.blob)
        self.push_blob(repo, img.config)
        return self.put_manifest(repo, tag or img.digest, img.manifest, img.manifest_type)

    def push_index(self, repo: str, tag: str, images: Sequence[tuple[Image, str]],
                   *, oci: bool = False) -> str:
        for img, _ in images:
            self.push_image(repo, img)
        return self.put_manifest(repo, tag, build_index(images, oci=oci),
                                 OCI_INDEX if oci else DOCKER_LIST)

    def blob_file(self, digest: str) -> str:
        hexd = digest.split(":", 1)[1]
        return os.path.join(self.root, "docker/registry/v2/blobs/sha256", hexd[:2], hexd,
                            "data")

    def requests(self, needle: str) -> int:
        """How many requests the registry logged whose URI contains `needle`."""
        with open(self.log_path) as f:
            return sum(1 for line in f if "response completed" in line and needle in line
                       and 'http.request.method=GET' in line)


@contextlib.contextmanager
def run_registry(auth: dict[str, Any] | None = None) -> Iterator[Registry]:
    """Start a registry in a temp dir on a free port; stop it (SIGTERM, then SIGKILL) and
    remove the dir after, even on failure."""
    tmp = tempfile.mkdtemp(prefix="pfsm-reg-")
    proc = None
    try:
        port = free_port()
        cfg: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": os.path.join(tmp, "data")},
                        "delete": {"enabled": True}},
            "http": {"addr": f"127.0.0.1:{port}"},
        }
        if auth:
            cfg["auth"] = auth
        path = os.path.join(tmp, "config.yml")
        with open(path, "w") as f:
            json.dump(cfg, f)  # YAML is a superset of JSON
        log_path = os.path.join(tmp, "registry.log")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([REGISTRY_BIN, "serve", path], stdout=log, stderr=log,
                                    stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                with open(log_path) as f:
                    raise RuntimeError(f"docker-registry did not start: {f.read()[-2000:]}")
            time.sleep(0.05)
        yield Registry(os.path.join(tmp, "data"), port, proc, log_path)
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def hosts_toml(config_dir: str, host: str, mirror: str, *, server: str | None = None,
               extra: str = "") -> str:
    """Write <config_dir>/<host>/hosts.toml sending `host` to `mirror` (server: the upstream,
    default the mirror too, so that nothing ever leaves 127.0.0.1)."""
    d = os.path.join(config_dir, host)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "hosts.toml")
    with open(path, "w") as f:
        f.write(f'server = "{server or mirror}"\n\n[host."{mirror}"]\n'
                f'  capabilities = ["pull", "resolve"]\n{extra}')
    return path

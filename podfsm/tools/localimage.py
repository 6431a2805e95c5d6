"""A busybox image made on this host and put straight into a controller's image store, for the
tools that need an image without a registry (`podfsm bench --containers`): one uncompressed
layer holding the host's static busybox and its applets, stored, unpacked and recorded as a
pull would (content store, layer store, image record)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from datetime import UTC, datetime

from podfsm.config import ControllerConfig
from podfsm.core.images import ImageRecord, LayerRecord
from podfsm.core.imagespec import OCI_LAYER, chain_ids
from podfsm.drivers.images import LocalImages

BUSYBOX = "/bin/busybox"
NAME = "localhost/podfsm/busybox:bench"
APPLETS = ("sh", "sleep", "echo", "cat", "ls", "true")
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _layer() -> bytes:
    buf = io.BytesIO()
    with open(BUSYBOX, "rb") as f:
        data = f.read()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in ("bin", "etc", "tmp"):
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode = tarfile.DIRTYPE, 0o1777 if name == "tmp" else 0o755
            tf.addfile(ti)
        ti = tarfile.TarInfo("bin/busybox")
        ti.size, ti.mode = len(data), 0o755
        tf.addfile(ti, io.BytesIO(data))
        for a in APPLETS:
            ti = tarfile.TarInfo(f"bin/{a}")
            ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, "busybox", 0o777
            tf.addfile(ti)
        for name, text in (("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
                           ("etc/group", b"root:x:0:\n")):
            ti = tarfile.TarInfo(name)
            ti.size = len(text)
            tf.addfile(ti, io.BytesIO(text))
    return buf.getvalue()


async def import_busybox(cfg: ControllerConfig) -> str:
    """Put the busybox image into `cfg`'s image store (before a Controller opens it); its
    name."""
    layer = _layer()
    diff = _sha(layer)
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Cmd": ["sh"], "Env": ["PATH=/bin"]},
                         "rootfs": {"type": "layers", "diff_ids": [diff]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": _sha(config), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": diff, "size": len(layer)}],
    }).encode()
    drv = LocalImages(cfg.images_dir, cfg.registry_config_dir)
    await drv.open()
    try:
        for data in (layer, config, manifest):
            drv.store.put_blob(_sha(data), data)
        chain = chain_ids([diff])[0]
        await drv.unpack(chain, None, diff, OCI_LAYER)
        await drv.save_image(ImageRecord(
            id=_sha(config), repo_tags=(NAME,), size=len(layer) + len(config) + len(manifest),
            platform="linux/amd64", manifest_digest=_sha(manifest),
            manifest_media_type=OCI_MANIFEST, config_media_type=OCI_CONFIG,
            blobs=(_sha(manifest), _sha(config), diff),
            layers=(LayerRecord(digest=diff, media_type=OCI_LAYER, size=len(layer),
                                diff_id=diff, chain_id=chain),),
            pulled_at=datetime.now(UTC)))
    finally:
        await drv.close()
    return NAME

"""Image references as crictl and the kubelet send them, normalized as Docker does (pure).

`busybox` is `docker.io/library/busybox:latest`; `name@sha256:<hex>` names a manifest by digest;
`name:tag@sha256:<hex>` keeps the tag for the record but pulls the digest. The grammar is the
one of distribution's `reference` package (lower-case path components separated by `.`, `_`,
`__` or dashes; a domain is the first component when it holds a `.` or a `:` or is
`localhost`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from podfsm.core.errors import InvalidImageReference

DOCKER_HUB = "docker.io"
#: Where Docker Hub's registry API answers (the name `docker.io` has no API of its own).
DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_TAG = "latest"

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")
#: the longest name distribution accepts
MAX_NAME = 255


def is_digest(text: str) -> bool:
    """True for `sha256:<64 hex>` (or sha512)."""
    return _DIGEST.fullmatch(text) is not None


def check_digest(text: str, what: str = "digest") -> str:
    """`text` when it is a digest podfsm can verify, else InvalidImageReference naming it."""
    if not is_digest(text):
        raise InvalidImageReference(f"{what} {text!r} is not sha256:<64 hex digits>")
    return text


@dataclass(frozen=True)
class ImageReference:
    """A normalized reference: `domain/path[:tag][@digest]`."""

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """`domain/path`, the repository's full name."""
        return f"{self.domain}/{self.path}"

    @property
    def api_host(self) -> str:
        """The host whose certs.d directory configures this registry (docker.io as itself)."""
        return self.domain

    @property
    def repo_tag(self) -> str | None:
        """`name:tag`, as the image's RepoTags list it (None for a pull by digest alone)."""
        return f"{self.name}:{self.tag}" if self.tag else None

    def repo_digest(self, digest: str) -> str:
        """`name@digest`, as the image's RepoDigests list it."""
        return f"{self.name}@{digest}"

    @property
    def pull_ref(self) -> str:
        """What to ask the registry's manifests endpoint for: the digest if given, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def parse_reference(text: str, *, default_tag: bool = True) -> ImageReference:
    """Parse and normalize an image reference; InvalidImageReference names what is wrong.

    `default_tag`: a reference with neither tag nor digest gets `latest` (as a pull does)."""
    if not text or text != text.strip():
        raise InvalidImageReference(f"image reference {text!r} is empty or has spaces")
    rest, _, digest = text.partition("@")
    if digest:
        check_digest(digest, f"image reference {text!r}: digest")
    name, tag = rest, None
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        name, _, tag = rest.rpartition(":")
        if not _TAG.fullmatch(tag):
            raise InvalidImageReference(f"image reference {text!r}: bad tag {tag!r}")
    if len(name) > MAX_NAME:
        raise InvalidImageReference(f"image reference {text!r}: name longer than {MAX_NAME}")
    first, sep, remainder = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        domain, path = first, remainder
        port = domain.rpartition(":")[2] if not domain.endswith("]") else ""
        if not _DOMAIN.fullmatch(domain) or (":" in domain and int(port or 0) > 65535):
            raise InvalidImageReference(f"image reference {text!r}: bad domain {domain!r}")
    else:
        domain, path = DOCKER_HUB, name
    if domain == "index.docker.io":
        domain = DOCKER_HUB
    if domain == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    for comp in path.split("/"):
        if not _COMPONENT.fullmatch(comp):
            hint = " (repository names are lower case)" if comp.lower() != comp else ""
            raise InvalidImageReference(
                f"image reference {text!r}: bad path component {comp!r}{hint}")
    if tag is None and digest == "" and default_tag:
        tag = DEFAULT_TAG
    return ImageReference(domain=domain, path=path, tag=tag, digest=digest or None)


def registry_host_dirs(host: str) -> list[str]:
    """The certs.d directory names tried for `host`, as containerd tries them: `host_port_`
    (for a host with a port), the host itself, then `_default`."""
    names = []
    head, sep, port = host.rpartition(":")
    if sep and port.isdigit() and not host.endswith("]"):
        names.append(f"{head}_{port}_")
    names += [host, "_default"]
    return names

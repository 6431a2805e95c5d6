"""The one place that builds the real drivers from a ControllerConfig: the Controller uses it
for every driver it is not handed, and the benchmark for the drivers it measures alone, so both
measure and run the same configuration. It also claims for a Controller what all its drivers
share: root, the run and netns directories, and the controller's tag.

Each driver module is imported only when its driver is built: a Controller on fake drivers
(the unit tests) never loads pyroute2 or starts a reaper.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Literal

from podfsm.config import ControllerConfig
from podfsm.core.errors import PrerequisiteMissing
from podfsm.core.failpoints import Failpoint
from podfsm.drivers import linux
from podfsm.drivers.base import (
    ContainerDriver,
    HostDriver,
    ImageDriver,
    NamespaceDriver,
    NetworkDriver,
    RuntimeDriver,
)

if TYPE_CHECKING:
    from podfsm.drivers.store import FileStore


def namespaces(cfg: ControllerConfig) -> NamespaceDriver:
    from podfsm.drivers.namespaces import WorkerPoolNamespaces

    return WorkerPoolNamespaces(workers=cfg.workers, idle_exit=cfg.worker_idle_exit)


def network(cfg: ControllerConfig) -> NetworkDriver:
    from podfsm.drivers.cni import CniNetwork

    return CniNetwork(
        conf_dir=cfg.cni_conf_dir,
        bin_dirs=cfg.cni_bin_dirs,
        default_name=cfg.default_network_name,
        default_bridge=cfg.default_bridge,
        default_subnet=cfg.default_subnet,
        reaper_run_dir=cfg.run_dir,
        plugin_timeout=cfg.command_timeout,
    )


def runtime(cfg: ControllerConfig, name: Literal["runc", "crun"]) -> RuntimeDriver:
    """The driver of runtime handler `name`; `cfg.runtime_binary` applies to the default one."""
    from podfsm.drivers.runtime import OciRuntime

    binary = cfg.runtime_binary if name == cfg.runtime else None
    return OciRuntime(name, cfg.run_dir, binary=binary, pause_binary=cfg.pause_binary,
                      command_timeout=cfg.command_timeout)


def other_runtimes(cfg: ControllerConfig) -> list[RuntimeDriver]:
    """The handlers besides the default one that are installed here (found on PATH): each
    keeps its own root, <run_dir>/runtime/<name>, and shares the reaper."""
    from podfsm.drivers.runtime import installed

    others: list[Literal["runc", "crun"]] = [n for n in ("runc", "crun")
                                              if n != cfg.runtime and installed(n)]
    return [runtime(cfg, n) for n in others]


def user_namespaces_problem() -> str | None:
    """None when containers of a user-namespaced pod can have an idmapped rootfs here (the
    kernel's idmapped mounts, overlay over idmapped layers); else why not."""
    from podfsm.drivers.idmapmounts import support_problem

    return support_problem()


def host(*, mount_shm: bool) -> HostDriver:
    """`mount_shm` False: the files are written but no tmpfs is mounted (no pause will run)."""
    from podfsm.drivers.hostfiles import HostFiles

    return HostFiles(mount_shm=mount_shm)


def store(cfg: ControllerConfig) -> FileStore:
    """The record store under `cfg.state_dir`, not yet opened (FileStore.open takes its lock)."""
    from podfsm.drivers.store import FileStore

    return FileStore(cfg.state_dir)


def require_root() -> None:
    """PrerequisiteMissing unless this process runs as root (the real drivers need it)."""
    if os.geteuid() != 0:
        raise PrerequisiteMissing(
            "podfsm must run as root: it creates namespaces, mounts and containers"
        )


def claim_dirs(cfg: ControllerConfig) -> Callable[[], None]:
    """Make run_dir and netns_dir directories fit for root's state (see linux.secure_dir) and
    take run_dir's controller lock; return what releases the lock.

    run_dir is 0711: the pod's root (a high host uid) walks down to the pause rootfs; netns_dir
    0755, as `ip netns` makes /run/netns. run_dir holds the runtime roots and the sandbox
    directories: a second controller on it (even with another state_dir) would collect this
    one's sandboxes as its orphans, hence the lock."""
    linux.secure_dir(cfg.run_dir, 0o711, "run dir")
    linux.secure_dir(cfg.netns_dir, 0o755, "netns dir")
    return functools.partial(os.close, linux.lock_dir(cfg.run_dir, "controller.lock", "run dir"))


def controller_tag(cfg: ControllerConfig) -> str:
    """The tag in this controller's netns pin names: a hash of state_dir's real path (a path
    through a symlink names the same controller), so controllers on different state dirs never
    take each other's pins for orphans."""
    return hashlib.sha256(os.path.realpath(cfg.state_dir).encode()).hexdigest()[:8]


def images(cfg: ControllerConfig, failpoints: Mapping[str, Failpoint] | None = None,
           ) -> ImageDriver:
    """The image driver: registries per cfg.registry_config_dir, the store in cfg.images_dir;
    `failpoints` (a parsed plan) reaches the layer store (unpack_layer.*)."""
    from podfsm.core.imagespec import parse_platform
    from podfsm.drivers.images import LocalImages

    plat = parse_platform(cfg.image_platform) if cfg.image_platform else None
    return LocalImages(cfg.images_dir, cfg.registry_config_dir, platform=plat,
                       timeout=cfg.registry_timeout, failpoints=failpoints)


def containers(cfg: ControllerConfig) -> ContainerDriver:
    """The containers' driver: directories under <state_dir>/containers, runtimes under
    conmon, overlay lowers from the image store's layers."""
    from podfsm.drivers.containers import LocalContainers

    return LocalContainers(os.path.join(cfg.state_dir, "containers"), cfg.run_dir,
                           os.path.join(cfg.images_dir, "layers"),
                           command_timeout=cfg.command_timeout)

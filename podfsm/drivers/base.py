"""The small interfaces between the orchestrator and the system.

The orchestrator (podfsm.controller) talks to the world only through these Protocols; the
value types they take and return live in :mod:`podfsm.core.requests`. Real
drivers live beside this module; fakes for unit tests live in tests/fakes.py, and a contract test
runs the same behaviour against both.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any, Protocol

from podfsm.core.containerrecords import ContainerRecord, Exit
from podfsm.core.imageref import ImageReference
from podfsm.core.images import ImageRecord
from podfsm.core.imagespec import Descriptor, Platform
from podfsm.core.records import (
    CgroupStats,
    FilesystemUsage,
    NetworkResult,
    PinnedNamespaces,
    SandboxFiles,
    SandboxRecord,
    TaskInfo,
)
from podfsm.core.registryhosts import Endpoint, RegistryAuth
from podfsm.core.requests import (
    InterfaceInfo,
    NamespaceRequest,
    NetworkRequest,
    PauseRequest,
    SetAside,
)
from podfsm.core.spec import IDMapping, PodSandboxConfig
from podfsm.drivers.procstreams import ProcessStreams as ProcessStreams


class NamespaceDriver(Protocol):
    async def start(self) -> None:
        """Start the worker pool. Called once by the controller."""

    async def close(self) -> None:
        """Stop the worker pool. Pinned namespaces stay pinned."""

    async def create(self, req: NamespaceRequest) -> PinnedNamespaces:
        """Create, pin and verify. On failure nothing of this request is left pinned."""

    async def destroy(self, netns_path: str | None, userns_path: str | None) -> None:
        """Unpin both (MNT_DETACH + unlink). Idempotent: missing pins are not an error."""

    def owner_problem(self, ns: PinnedNamespaces) -> str | None:
        """None when the pinned netns is owned by the pinned user namespace, the one `ns`
        records (or the pod does not have both); else what is wrong. Checked before the
        runtime is let near the netns: crun would silently bind the host's /sys if mounting
        sysfs failed."""

    def pin_problem(self, ns: PinnedNamespaces) -> str | None:
        """None when each pin `ns` records still holds the namespace it records (the same
        inode); else which pin no longer does. Checked after a restart, before a sandbox is
        supervised again."""

    def pins_exist(self, *paths: str | None) -> bool:
        """Whether anything is at any of `paths` (None is skipped): a pin, mounted or not, or
        whatever took its place; a symlink counts and is not followed."""

    def pins_in(self, directory: str, prefix: str) -> list[str]:
        """The names of the entries of `directory` that start with `prefix` (the netns pins a
        controller tags as its own), sorted; none when `directory` is missing."""


class NetworkDriver(Protocol):
    async def start(self) -> None:
        """Load the network config and check the plugins exist. Called once."""

    async def close(self) -> None:
        """Release what start() took; attachments stay as they are."""

    async def attach(self, req: NetworkRequest) -> NetworkResult:
        """CNI ADD through the conflist's plugins, prevResult chained. Raises StepFailed with
        the plugin's own message on failure (and has already run DEL for what it added)."""

    async def detach(self, req: NetworkRequest, result: NetworkResult | None) -> None:
        """CNI DEL in reverse order. Idempotent; succeeds when the netns is already gone."""

    async def interfaces(self, netns_path: str) -> list[InterfaceInfo]:
        """Read the pod's interfaces and addresses from its pinned netns (pyroute2, flags=0)."""

    async def reserved_container_ids(self) -> set[str]:
        """Container ids holding an address in this network's IPAM store (for orphan GC)."""

    def problem(self) -> str | None:
        """None when the network loaded at start() is still usable (every plugin it needs is
        still an executable file); else what is wrong, in words."""

    def address_families(self) -> frozenset[int] | None:
        """The IP versions (4, 6) the network gives pods (after start()); None when its
        configuration does not tell."""


class RuntimeDriver(Protocol):
    name: str  # "runc" or "crun"

    async def start(self) -> None:
        """Check the runtime binary, assemble the shared pause rootfs, connect to the reaper."""

    async def close(self) -> None:
        """Disconnect; containers and the reaper keep running."""

    def bundle_path(self, container_id: str) -> str:
        """Where the bundle of `container_id` lives (under run_dir)."""

    def bundle_ids(self) -> list[str]:
        """The names of the bundle directories under run_dir: a `create` cut short by a crash
        can leave a bundle of a container the runtime does not list (for orphan collection)."""

    async def create(self, req: PauseRequest) -> TaskInfo:
        """Write the bundle and run `create --pid-file`; the pause process exists, not started."""

    async def start_task(self, container_id: str) -> None:
        """Run `start`."""

    async def kill_task(self, task: TaskInfo, grace: float) -> int | None:
        """End the pause process `task` (SIGTERM, SIGKILL after `grace` seconds) through a
        pidfd and wait until it is gone; its exit status as `wait_exit_status` gives it, or
        None when unknown (or the pid is no longer the task's). StepFailed if it survives."""

    async def wait_task_exit(self, task: TaskInfo) -> None:
        """Return once the pause process `task` has exited, or at once when it is gone
        already or its pid belongs to another process now. The exit is noticed the moment it
        happens (a pidfd becomes readable), never by polling; a cancelled wait leaves nothing
        open. This is the controller's exit supervision."""

    def task_alive(self, task: TaskInfo) -> bool:
        """True while the pause process `task` exists (a zombie counts), the same process,
        not a reuse of its pid."""

    def task_problem(self, task: TaskInfo, ns: PinnedNamespaces | None) -> str | None:
        """None when the pause process `task` is alive, the same process (not a reuse of its
        pid), and in the user and net namespaces `ns` records (the host's when None or
        unset); else what is wrong."""

    async def delete(self, container_id: str) -> None:
        """`delete --force` and remove the bundle. Idempotent."""

    async def list_containers(self) -> list[str]:
        """Ids of every container under this controller's runtime root."""

    async def states(self) -> dict[str, str]:
        """The status of every container under this controller's runtime root, in one call."""

    async def wait_exit_status(self, task: TaskInfo, timeout: float) -> int | None:
        """The task's wait status decoded as a shell would (128+signal for a signal), when the
        reaper has it within `timeout` seconds; None when it cannot be known."""


class HostDriver(Protocol):
    """What a sandbox needs from the host besides namespaces, network and runtime: its run
    directory, its files (hostname, hosts, resolv.conf), its /dev/shm tmpfs, its log
    directory, and the cleaning of the cgroup parent directories the runtime leaves; and the
    host's read-only reports for status and statistics (podfsm.drivers.sysinfo)."""

    def create_sandbox_dir(self, path: str) -> None:
        """Create the sandbox's run directory `path`, mode 0711 whatever the umask (the pod's
        mapped root must reach the files bound from there; nothing in it is listable by
        others), parents as needed. Idempotent."""

    def remove_sandbox_dir(self, path: str) -> None:
        """Remove the sandbox's run directory `path` with what is left in it, never following
        a symlink (one at `path` is refused). Idempotent; OSError when it cannot be removed."""

    def sandbox_dirs(self, parent: str) -> list[str]:
        """The names of the entries of `parent`, where the sandboxes' run directories live
        (for orphan collection); none when `parent` is missing or not a directory."""

    async def setup_files(self, sandbox_dir: str, pod: PodSandboxConfig,
                          made_by_others: Collection[str] = ()) -> SandboxFiles:
        """Write the files under `sandbox_dir`, mount the /dev/shm tmpfs (unless ipc NODE) and
        create the log directory, never through a symlink in what it creates; the directories
        of `made_by_others` (made by podfsm for other sandboxes) that the log directory lies in
        are recorded as this sandbox's too. On failure, what this call made is undone."""

    async def release_shm(self, shm_path: str) -> None:
        """Unmount the pod's /dev/shm tmpfs at `shm_path` and remove its mount point (the
        host's /dev/shm is left alone). Idempotent."""

    async def remove_files(self, files: SandboxFiles, in_use: Collection[str] = (),
                           named: Collection[str] = ()) -> None:
        """release_shm, remove the written files, and the log directories podfsm made for
        this sandbox if they are empty and neither one of `in_use` (other sandboxes' log
        directories and the directories made for them, symlinks resolved) or of `named` (log
        directories as named, resolved here) nor above one; each is reached from / without
        following a symlink. Idempotent."""

    async def remove_cgroup_parent(self, cgroup_parent: str, cgroup_root: str,
                                   in_use: Collection[str] = ()) -> None:
        """rmdir, in every hierarchy, the empty directories from `cgroup_parent` up to (not
        including) `cgroup_root` that are neither one of `in_use` (other sandboxes' cgroup
        parents) nor above one: the runtime's delete removes only the container's own."""

    def real_path(self, path: str) -> str:
        """`path` with the symlinks of its existing part resolved (realpath), at admission."""

    def read_seccomp_profile(self, path: str, limit: int) -> bytes:
        """The content of a Localhost seccomp profile, read at admission (so synchronous and
        bounded): ValueError, saying why in words that never quote the file nor tell a missing
        path from a directory, a device or a FIFO, when it is not a readable regular file or
        is over `limit`. It never makes a terminal the daemon's, nor blocks on a FIFO."""

    def sysctl_exists(self, name: str) -> bool:
        """Whether the kernel has the sysctl `name` ("net.ipv4.ip_forward"), at admission."""

    def pod_sysctls(self, own_userns: bool) -> Mapping[str, str | None] | None:
        """The namespaced sysctls a pod with (or without) its own user namespace can write,
        each with the value it starts with (None when unreadable); None when they cannot be
        listed here (then sysctl_exists decides). Listed once."""

    async def try_sysctls(self, values: Mapping[str, str],
                          id_maps: tuple[IDMapping, IDMapping] | None) -> dict[str, str]:
        """Write `values` in new namespaces of the pod's kind (a user namespace with these uid
        and gid mappings, or the host's: None), before anything is made: each sysctl the
        kernel refused, with its reason. OSError when they cannot be tried."""

    async def local_addresses(self) -> list[str]:
        """The addresses of the host's interfaces, IPv4 and IPv6 (for documents)."""

    async def address_kind(self, address: str) -> str:
        """What the host's routing makes of `address`: "local" for one of this host's
        addresses, else why not in words (a broadcast or multicast address, not this host's)."""

    def security_modules(self) -> frozenset[str]:
        """The Linux security modules enabled on the host that podfsm would have to apply:
        "selinux", "apparmor"."""

    def cgroup_stats(self, pid: int) -> CgroupStats | None:
        """CPU and memory of the cgroup process `pid` is in; None when it cannot be read."""

    def filesystem_usage(self, paths: list[str]) -> list[FilesystemUsage]:
        """One entry per filesystem holding any of `paths`, in the order first met."""

    def runtime_spec(self, bundle_path: str | None) -> dict[str, Any] | None:
        """The OCI runtime spec (config.json) of the bundle at `bundle_path`, or None when
        there is none."""


class Store(Protocol):
    async def load_all(
        self, check: Callable[[SandboxRecord], str | None] | None = None
    ) -> tuple[list[SandboxRecord], list[SetAside]]:
        """Every usable record, and the records that were set aside: unreadable ones and those
        for which `check` says why they cannot be used."""

    async def save(self, rec: SandboxRecord, *, durable: bool = False) -> None:
        """Atomically replace the record of rec.id (a crash of the controller leaves the old
        record or the new one); `durable`: and so does a crash of the machine."""

    async def delete(self, sandbox_id: str) -> None:
        """Forget a sandbox. Idempotent."""


JsonDict = dict[str, Any]


class ImageDriver(Protocol):
    """Registries, the content store, image records and layer directories (see
    drivers/images.py). Blocking work runs in worker threads."""

    async def open(self) -> dict[str, ImageRecord]:
        """Take the image dir, remove what a crash left (downloads, unfinished layers, content
        no record needs) and return the records."""

    async def close(self) -> None:
        """Close registry connections and release the image dir."""

    def platform(self) -> Platform:
        """The platform pulled from an index (the host's unless configured)."""

    async def resolve(self, ref: ImageReference, auth: RegistryAuth,
                      ) -> tuple[bytes, str, str, Endpoint]:
        """The top manifest or index of `ref`, verified: (body, content type, digest, the
        endpoint that answered)."""

    async def fetch_manifest(self, ref: ImageReference, desc: Descriptor, first: Endpoint,
                             auth: RegistryAuth) -> tuple[bytes, str]:
        """A manifest named by an index entry, verified: (body, content type)."""

    async def has_blob(self, digest: str, size: int) -> bool:
        """Whether the store holds blob `digest` (whole: `size` bytes)."""

    async def put_document(self, digest: str, data: bytes) -> None:
        """Store a verified small document (manifest, index, config) as blob `digest`."""

    async def read_blob(self, digest: str) -> bytes:
        """A small blob's bytes."""

    async def fetch_blob(self, ref: ImageReference, desc: Descriptor, first: Endpoint,
                         auth: RegistryAuth) -> None:
        """Download blob `desc` into the store, verified against its digest and size;
        DigestMismatch names it, and nothing of it is kept. (A layer's diff id is verified
        where it is decompressed anyway: by `unpack`.)"""

    async def unpack(self, chain_id: str, parent: str | None, digest: str,
                     media_type: str) -> str:
        """Unpack layer blob `digest` once as layer `chain_id`; its directory. The blob's
        uncompressed content must give that chain id above `parent`: DigestMismatch names the
        blob when it does not (or is not a readable stream); UnpackError names a hostile
        entry."""

    async def save_image(self, rec: ImageRecord) -> None:
        """Write the image's record atomically."""

    async def delete_image(self, image_id: str) -> None:
        """Remove the image's record. Idempotent."""

    async def remove_content(self, blobs: set[str], chain_ids: set[str]) -> None:
        """Remove blobs and layer directories (no image needs them)."""

    async def usage(self) -> FilesystemUsage:
        """The bytes and inodes the image store holds, with its mount point."""


class ContainerDriver(Protocol):
    """What the containers need from the system: their records and directories, the overlay
    rootfs, the image's /etc files, and the runtime under a monitor (conmon) per container
    (podfsm.drivers.containers)."""

    def open(self, runtimes: Mapping[str, Any]) -> None:
        """Take the started pause runtime drivers (binaries, reaper); make the directories."""

    def load_all(self) -> tuple[list[ContainerRecord], list[str]]:
        """Every readable container record, and what was wrong with the others."""

    async def save(self, rec: ContainerRecord) -> None:
        """Write the record atomically (temp file, fsync, rename)."""

    def dir(self, container_id: str) -> str:
        """The container's directory (its bundle)."""

    def layer_path(self, chain_id: str) -> str:
        """The unpacked layer `chain_id` (an overlay lower dir)."""

    async def mount_rootfs(self, container_id: str, lowers: list[str],
                           userns_path: str | None = None) -> str:
        """Mount the overlay of `lowers` (topmost first) + the container's upper; its path.
        With `userns_path` (the pod's user namespace) the lowers are idmapped by it and the
        upper and work belong to its mapped root; IdmapUnsupported names what cannot."""

    async def mount_volume(self, container_id: str, index: int, src: str, userns_path: str,
                           readonly: bool) -> str:
        """Idmap a CRI mount's host path `src` by the pod's user namespace under the
        container's directory; the path the spec binds."""

    def idmap_problem(self) -> str | None:
        """Why this kernel cannot give containers an idmapped rootfs, or None."""

    async def unmount_rootfs(self, container_id: str) -> None:
        """Unmount everything under the container's directory (rootfs, volumes). Idempotent."""

    async def remove_dir(self, container_id: str) -> None:
        """Unmount and remove the container's directory, its record last. Idempotent."""

    async def read_etc(self, rootfs: str, name: str) -> str:
        """The image's /etc/<name> ("" when missing), never through a symlink."""

    def real_host_path(self, path: str) -> str:
        """`path` with symlinks resolved; OSError when it does not exist."""

    def held_capabilities(self) -> list[str]:
        """The capabilities in podfsm's own bounding set (what `ALL` and privileged give)."""

    def host_devices(self) -> dict[str, tuple[str, int, int, int, int, int]]:
        """Every device node under the host's /dev (but pts, shm, mqueue), by path: what a
        privileged container gets."""

    def platform(self) -> tuple[str, tuple[int, int]]:
        """The machine (uname -m) and the kernel's (major, minor): the RuntimeDefault seccomp
        profile depends on them."""

    def host_device(self, path: str) -> tuple[str, int, int, int, int, int]:
        """(c|b, major, minor, mode, uid, gid) of a device node; ValueError if not one."""

    async def write_spec(self, container_id: str, spec: dict[str, Any]) -> None:
        """Write config.json into the bundle."""

    def remove_spec(self, container_id: str) -> None:
        """Remove config.json. Idempotent."""

    def read_spec(self, container_id: str) -> dict[str, Any] | None:
        """The bundle's config.json, or None."""

    def usage(self, container_id: str) -> tuple[int, int]:
        """Bytes and inodes of the container's writable layer."""

    async def create(self, runtime: str, container_id: str, name: str, log_path: str, *,
                     tty: bool, stdin: bool, stdin_once: bool = False
                     ) -> tuple[TaskInfo, TaskInfo]:
        """Start the monitor, which runs the runtime's create: (init, monitor) processes.
        `stdin_once`: the first attached client's end of stdin closes the container's."""

    async def start(self, runtime: str, container_id: str) -> None:
        """Runtime start."""

    async def kill(self, runtime: str, container_id: str, sig: int) -> None:
        """Signal the container (every process with SIGKILL). Gone is not an error."""

    async def delete(self, runtime: str, container_id: str) -> None:
        """Runtime delete --force. Idempotent."""

    def exists(self, runtime: str, container_id: str) -> bool:
        """Whether the runtime has this container."""

    async def state(self, runtime: str, container_id: str) -> str | None:
        """The runtime's status of the container (created, running, stopped) or None."""

    def runtime_ids(self) -> dict[str, list[str]]:
        """Handler -> the ids of the containers under its container root."""

    def dir_ids(self) -> list[str]:
        """The names of the containers' directories."""

    def exit_of(self, container_id: str) -> Exit | None:
        """The exit the monitor recorded (code, time, OOM), or None."""

    async def wait_exit(self, monitor: TaskInfo) -> None:
        """Return once the monitor process has exited (it records the exit first)."""

    def alive(self, task: TaskInfo) -> bool:
        """Whether the process `task` still runs (the same one, not a reuse of its pid)."""

    async def reopen_log(self, container_id: str, log_path: str) -> None:
        """Tell the monitor to reopen the log file (after a rotation); return once it has."""

    async def exec_sync(self, runtime: str, container_id: str, process: dict[str, Any],
                        timeout: float) -> tuple[int, str, str]:
        """Run `process` in the container: (exit code, stdout, stderr); ExecTimeout."""

    async def exec_stream(self, runtime: str, container_id: str, process: dict[str, Any], *,
                          tty: bool, stdin: bool) -> ProcessStreams:
        """Start `process` in the container for a streaming session (stdio on pipes, or a
        tty); closing it kills and reaps whatever of it still runs."""

    async def attach_stream(self, container_id: str) -> ProcessStreams:
        """Attach to the container's stdio through its monitor; OSError if it has none."""

    async def update(self, runtime: str, container_id: str, resources: dict[str, Any]
                     ) -> None:
        """Change the container's cgroup limits (runtime update)."""

    async def read_lines(self, path: str, offset: int) -> tuple[list[str], int]:
        """The whole lines of the log file `path` from byte `offset`, and the next offset."""

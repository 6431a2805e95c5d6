"""Errors raised by podfsm. Each one names the problem in words a node operator understands."""

from __future__ import annotations


class PodfsmError(Exception):
    """Base class of every error podfsm raises on purpose."""


class InvalidPodConfig(PodfsmError, ValueError):
    """The pod config was refused before anything was created on the system."""


class IdRangeUnavailable(InvalidPodConfig):
    """The pod's host id range cannot be had now: the one asked for overlaps another sandbox's,
    or the id pool has no free range left. Refused before anything is created, like any
    invalid config, but a conflict with the sandboxes that exist (HTTP 409), not a fault of
    the config alone: the same request may succeed once they are removed."""


class NameReserved(PodfsmError):
    """A sandbox with the same metadata name, namespace and attempt already exists."""

    def __init__(self, name: str, existing_id: str) -> None:
        super().__init__(f"pod sandbox name {name!r} is reserved for sandbox {existing_id}")
        self.name = name
        self.existing_id = existing_id


class SandboxNotFound(PodfsmError, KeyError):
    """No sandbox with that id is known to this controller."""

    def __init__(self, sandbox_id: str) -> None:
        super().__init__(sandbox_id)
        self.sandbox_id = sandbox_id

    def __str__(self) -> str:
        return f"pod sandbox {self.sandbox_id!r} not found"


class IllegalTransition(PodfsmError):
    """A trigger was fired in a state whose table has no such transition."""

    def __init__(self, state: str, trigger: str) -> None:
        super().__init__(f"trigger {trigger!r} is not allowed in state {state}")
        self.state = state
        self.trigger = trigger


class PrerequisiteMissing(PodfsmError):
    """Something podfsm needs on the host is missing (a binary, a plugin, root)."""


class StepFailed(PodfsmError):
    """A step that touches the system failed. Carries the step name and the cause's message."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step
        self.message = message


class SandboxRunError(PodfsmError):
    """run_sandbox failed: says which step failed and, if unwinding failed too, what is left."""

    def __init__(self, step: str, cause: BaseException, leftovers: list[str]) -> None:
        msg = f"run_sandbox failed at step {step!r}: {cause}"
        if leftovers:
            msg += "; unwinding failed too, left on the system: " + "; ".join(leftovers)
        else:
            msg += "; everything done was unwound"
        super().__init__(msg)
        self.step = step
        self.cause = cause
        self.leftovers = leftovers


class ControllerLocked(PodfsmError):
    """Another controller already owns this state directory."""


class StateDirError(PodfsmError):
    """The state directory cannot be written (missing, read-only, full)."""


class UnsafeDirectory(StateDirError):
    """A directory podfsm keeps root's state in (state_dir, run_dir, netns_dir) is not a
    directory, is owned by another user, or is writable by group or others."""


class InvalidPullRequest(PodfsmError, ValueError):
    """A pull request that cannot be served as given (its reference, its credentials); nothing
    was fetched."""


class InvalidImageReference(InvalidPullRequest):
    """An image reference (or digest) that does not parse; nothing was fetched."""


class ImageNotFound(PodfsmError, KeyError):
    """No image with that id, tag, digest or id prefix is in the store."""

    def __init__(self, ref: str) -> None:
        super().__init__(ref)
        self.ref = ref

    def __str__(self) -> str:
        return f"image {self.ref!r} not found"


class ImagePullError(PodfsmError):
    """A pull failed: the registry refused or lacked something, a document was malformed, or
    content did not match its digest. Nothing of the failed pull is kept."""


class ImageNotInRegistry(ImagePullError):
    """Every registry endpoint asked answered that it has no such manifest (404)."""


class DigestMismatch(ImagePullError):
    """Content fetched for a digest hashed (or measured) to something else."""

    def __init__(self, digest: str, message: str) -> None:
        super().__init__(f"content of {digest} does not match: {message}")
        self.digest = digest


class ImageInUse(PodfsmError):
    """The image is used by a container and may not be removed."""


class UnpackError(PodfsmError):
    """An image layer was refused while it was unpacked: not a layer (media type, compression,
    tar format, digest), or an entry that would write outside the layer directory or cannot be
    represented. `entry` names the offending archive member ("" when the fault is the stream's,
    not one member's); `layer` the chain id, once known. Nothing of the layer is left behind."""

    def __init__(self, entry: str, reason: str, layer: str = "") -> None:
        super().__init__(entry, reason, layer)
        self.entry = entry
        self.reason = reason
        self.layer = layer

    def __str__(self) -> str:
        where = f"layer {self.layer}" if self.layer else "layer"
        if self.entry:
            where += f": entry {self.entry!r}"
        return f"{where}: {self.reason}"


class InvalidContainerConfig(InvalidPodConfig):
    """The container config was refused before anything was created on the system."""


class ContainerNotFound(PodfsmError, KeyError):
    """No container has this id (or id prefix)."""

    def __init__(self, container_id: str) -> None:
        super().__init__(container_id)
        self.container_id = container_id

    def __str__(self) -> str:
        return f"container {self.container_id!r} not found"


class ContainerPrecondition(PrerequisiteMissing):
    """The container cannot do this now: its sandbox is not ready, it is in the wrong state,
    or its pod has a user namespace (containers there arrive with a later issue)."""


class ExecTimeout(PodfsmError):
    """An ExecSync command outlived its timeout and was killed."""


class ContainerNameReserved(NameReserved):
    """A container with the same name and attempt already exists in the pod."""

    def __init__(self, name: str, existing_id: str) -> None:
        PodfsmError.__init__(self, f"container name {name!r} is reserved for container "
                                   f"{existing_id} in this pod")
        self.name = name
        self.existing_id = existing_id

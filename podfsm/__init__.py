"""podfsm: Kubernetes-style pod sandboxes with a pod-level user namespace, each a finite-state
machine whose every step has a compensating step.

    import podfsm
    async with podfsm.Controller(podfsm.ControllerConfig(...)) as ctl:
        st = await ctl.run_sandbox(podfsm.PodSandboxConfig.model_validate(pod_json))
"""

from podfsm.config import ControllerConfig
from podfsm.controller import Controller
from podfsm.core.errors import (
    ControllerLocked,
    IdRangeUnavailable,
    IllegalTransition,
    InvalidPodConfig,
    NameReserved,
    NodeFull,
    PodfsmError,
    PrerequisiteMissing,
    SandboxNotFound,
    SandboxRunError,
    StateDirError,
    StepFailed,
    UnsafeDirectory,
)
from podfsm.core.records import HistoryEntry, SandboxStatus, TransitionEvent
from podfsm.core.spec import IDMapping, PodSandboxConfig, parse_pod_config
from podfsm.core.states import State, Trigger

__all__ = [
    "Controller",
    "ControllerConfig",
    "ControllerLocked",
    "HistoryEntry",
    "IDMapping",
    "IdRangeUnavailable",
    "IllegalTransition",
    "InvalidPodConfig",
    "NameReserved",
    "NodeFull",
    "PodSandboxConfig",
    "PodfsmError",
    "PrerequisiteMissing",
    "SandboxNotFound",
    "SandboxRunError",
    "SandboxStatus",
    "State",
    "StateDirError",
    "StepFailed",
    "TransitionEvent",
    "Trigger",
    "UnsafeDirectory",
    "parse_pod_config",
]
__version__ = "0.1.0"

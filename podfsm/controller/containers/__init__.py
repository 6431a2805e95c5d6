"""The container half of the Controller, one module per verb (create, start, stop, remove,
query, exec) over a shared base, and the recovery of containers at start. Each container has
its own state machine (podfsm.core.containerstates) and belongs to one sandbox."""

from __future__ import annotations

from podfsm.controller.containers.exec import ExecContainers, ExecResult
from podfsm.controller.containers.query import ContainerStats
from podfsm.controller.containers.recovery import RecoverContainers
from podfsm.controller.containers.start import StartContainer


class Containers(RecoverContainers, StartContainer, ExecContainers):
    """create_container, start_container, stop_container, remove_container,
    container_status, list_containers, container_stats, container_info, exec_sync,
    container_logs, reopen_container_log, update_container_resources."""


__all__ = ["ContainerStats", "Containers", "ExecResult"]

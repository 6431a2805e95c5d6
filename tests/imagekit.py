"""Images for the tests and a real registry on 127.0.0.1: the kit lives in
podfsm/tools/imagekit.py (`podfsm bench --pull` uses it too); this module keeps the tests'
name for it."""

from __future__ import annotations

from podfsm.tools.imagekit import (
    BUSYBOX,
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    REGISTRY_BIN,
    Entry,
    Image,
    Layer,
    Registry,
    build_image,
    build_index,
    busybox_layer,
    free_port,
    hosts_toml,
    make_layer,
    run_registry,
    sha,
)

__all__ = ["BUSYBOX", "DOCKER_CONFIG", "DOCKER_LAYER", "DOCKER_LIST", "DOCKER_MANIFEST",
           "OCI_CONFIG", "OCI_INDEX", "OCI_LAYER", "OCI_MANIFEST", "REGISTRY_BIN", "Entry",
           "Image", "Layer", "Registry", "build_image", "build_index", "busybox_layer",
           "free_port", "hosts_toml", "make_layer", "run_registry", "sha"]

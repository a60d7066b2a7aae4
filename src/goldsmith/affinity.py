"""Which build host runs a template's tasks: a local build's VM and staging area live on the host that
provisioned them, so every task of the run must execute there.

Each build host runs a Celery worker on its own queue `goldsmith.<host>` (`airflow celery worker -q
goldsmith.<host>`) and has its own VM pool `goldsmith_build_vms.<host>`, so the pool bounds VMs per host, not per
cluster. A template is pinned to one host: `GOLDSMITH_TEMPLATE_HOSTS` (a JSON object template → host) if it
names it, otherwise a stable hash of the template name over `GOLDSMITH_BUILD_HOSTS` (comma-separated). The
pinning is decided when the DAG is parsed, so every task of every run of a template goes to the same queue.

Without build hosts (one machine) or on the azure backend (its state lives in ARM, any worker can run any
step) tasks use Airflow's `default` queue and the cluster-wide pool `goldsmith_build_vms`.

prepare_staging records the host it ran on (`this_host()`: `GOLDSMITH_HOST`, else the hostname) in the staging
marker and its XCom; a later step of a local build that lands on another host fails at once naming the host
that holds the VM, instead of failing on a missing file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from dataclasses import dataclass

BUILD_VM_POOL = "goldsmith_build_vms"
DEFAULT_QUEUE = "default"
HOSTS_VAR = "GOLDSMITH_BUILD_HOSTS"
TEMPLATE_HOSTS_VAR = "GOLDSMITH_TEMPLATE_HOSTS"
_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


class AffinityError(ValueError):
    """The build-host settings are wrong; the message names the variable and the fix."""


@dataclass(frozen=True)
class Placement:
    host: str | None  # None: any worker
    queue: str
    pool: str


def build_hosts() -> list[str]:
    hosts = [h.strip() for h in os.environ.get(HOSTS_VAR, "").split(",") if h.strip()]
    for h in hosts:
        if not _HOST.match(h):
            raise AffinityError(f"{HOSTS_VAR}: {h!r} is not a host name (letters, digits, '-', '_'; it becomes the "
                                f"queue goldsmith.{h})")
    if len(set(hosts)) != len(hosts):
        raise AffinityError(f"{HOSTS_VAR}: a host is listed twice: {','.join(hosts)}")
    return hosts


def template_hosts() -> dict[str, str]:
    raw = os.environ.get(TEMPLATE_HOSTS_VAR, "").strip()
    if not raw:
        return {}
    try:
        mapping = json.loads(raw)
    except json.JSONDecodeError as e:
        raise AffinityError(f"{TEMPLATE_HOSTS_VAR}: not JSON ({e.msg} at column {e.colno}): write an object "
                            '{"<template>": "<host>"}') from None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise AffinityError(f'{TEMPLATE_HOSTS_VAR}: must be a JSON object {{"<template>": "<host>"}}')
    return mapping


def placement(template: str, backend: str) -> Placement:
    hosts = build_hosts()
    if backend != "local" or not hosts:
        return Placement(None, DEFAULT_QUEUE, BUILD_VM_POOL)
    host = template_hosts().get(template) or hosts[_stable_index(template, len(hosts))]
    if host not in hosts:  # only this template's DAG reports it: a typo in one entry hides no other template
        raise AffinityError(f"{TEMPLATE_HOSTS_VAR}: template {template!r} is pinned to {host!r}, which is not in "
                            f"{HOSTS_VAR} ({','.join(hosts)}): add the host there or fix the name")
    return Placement(host, f"goldsmith.{host}", f"{BUILD_VM_POOL}.{host}")


def pools() -> list[str]:
    """The VM pools a deployment needs: one per build host, or the single cluster-wide one."""
    return [f"{BUILD_VM_POOL}.{h}" for h in build_hosts()] or [BUILD_VM_POOL]


def _stable_index(name: str, n: int) -> int:
    # Not hash(): Python salts it per process, and every scheduler and worker must agree.
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % n


def this_host() -> str:
    return os.environ.get("GOLDSMITH_HOST") or socket.gethostname()


def wrong_host(recorded: str | None) -> str | None:
    """Why this task cannot run here, if the run's build VM lives on another host."""
    here = this_host()
    if not recorded or recorded == here:
        return None
    return (f"this run's build VM and staging area are on host {recorded!r}, but this task ran on {here!r}: "
            f"route the template's tasks to queue goldsmith.{recorded} (a worker started with "
            f"`airflow celery worker -q goldsmith.{recorded}` and GOLDSMITH_HOST={recorded})")

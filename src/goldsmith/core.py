"""The backend-neutral core: what every build step knows about its run, the contract each backend implements,
and the registry that names the backends and the triggers their waits need.

A step runs in its own process (an Airflow task), maybe on another worker: it gets the plan from XCom and
finds everything else in the staging area by deterministic name, so a retry adopts what an earlier try made.

The core imports no backend and no Airflow (tests/test_import_graph.py): the registry names the parts by
module path, imported when a build needs them. A step that started long operations raises `Pending` with a
plain-JSON wait; the operator turns it into an Airflow trigger with `trigger_for`, so no backend step imports
Airflow either.
"""

from __future__ import annotations

import importlib
import logging
import re
import uuid
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from goldsmith.provenance import Provenance
from goldsmith.template.model import GoldsmithOptions, ImageTemplate
from goldsmith.template.plan import BuildPlan, Step

_STAGING_NAMESPACE = uuid.UUID("8f4c2d0e-6a43-4a57-9d55-0b5d2a1e7c11")
_RG_IN_ID = re.compile(r"/resourceGroups/([^/]+)/", re.IGNORECASE)

# The registry: a backend name (the template's `goldsmith.backend`, or a composition) -> its class, and a
# wait's `trigger` name -> the Airflow trigger that waits on it; "module:attribute", imported on use.
BACKENDS: dict[str, str] = {
    "local": "goldsmith.local.backend:LocalBackend",
    "azure": "goldsmith.azure.backend:AzureBackend",
    # Build locally, publish to Azure: a local template whose VHD target is a blob URL.
    "local+azure": "goldsmith.composed:local_to_azure",
}
TRIGGERS: dict[str, str] = {
    "arm": "goldsmith.azure.triggers:ArmWaitTrigger",
}
# A backend's source resolver (`plan`, the source AssetWatcher, `goldsmith outdated`): a callable of
# (home=, conn_id=, location=) that returns a SourceResolver.
SOURCES: dict[str, str] = {
    "local": "goldsmith.local.sources:resolver",
    "azure": "goldsmith.azure.sources:resolver",
}
# What each family of publishers published, with its provenance (lineage): a callable of (home, templates)
# that returns a list of provenance.Artifact.
PUBLISHED: dict[str, str] = {
    "local": "goldsmith.local.published:artifacts",
    "azure": "goldsmith.azure.published:artifacts",
}


class BuildError(Exception):
    """A build step failed for a reason the user can act on; the message says which and how."""


class Reused(Exception):
    """Raised by a step whose result a cached layer already holds (goldsmith.local.layers): the task shows as
    skipped, with this message saying which layer from which run."""


class Pending(Exception):
    """Raised by a step that started long operations: wait until `wait` is over, then call the step again; it
    continues from what exists. `wait` is plain JSON (it goes to XCom): {"trigger": a TRIGGERS name, **the
    trigger's keyword arguments}."""

    def __init__(self, what: str, wait: dict[str, Any]):
        super().__init__(what)
        self.what, self.wait = what, wait


def trigger_for(wait: dict[str, Any]) -> Any:
    """The Airflow trigger that fires when `wait` (a Pending's) is over."""
    kwargs = dict(wait)
    return load(TRIGGERS, kwargs.pop("trigger"))(**kwargs)


def load(registry: dict[str, str], name: str) -> Any:
    if name not in registry:
        raise BuildError(f"'{name}' is not one of {', '.join(sorted(registry))} in this installation")
    module, _, attribute = registry[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class Build:
    plan: BuildPlan
    dag_id: str
    run_id: str
    params: dict[str, Any] = field(default_factory=dict)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("goldsmith.build"))
    # goldsmith.secrets, resolved (and masked) by the customize/validate task that needs them; never in XCom.
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)
    source: dict[str, Any] = field(default_factory=dict)  # the plan's resolved source (`resolve_source`)

    @property
    def guid(self) -> str:
        """Derived from the DAG run, so every try of every step of one run names the same staging area."""
        return str(uuid.uuid5(_STAGING_NAMESPACE, f"{self.dag_id}/{self.run_id}"))

    @property
    def staging_name(self) -> str:
        """AIB's `IT_<destinationResourceGroup>_<templateName>_<guid>`, within Azure's 90-character limit."""
        rg = destination_resource_group(self.plan) or "goldsmith"
        head = f"IT_{rg}_{self.plan.name}"[: 90 - len(self.guid) - 1]
        return f"{head}_{self.guid}"

    @property
    def run_key(self) -> str:
        """Marks artifacts made by this run, so a retried distribute adopts them instead of publishing twice."""
        return f"{self.dag_id}/{self.run_id}"


def destination_resource_group(plan: BuildPlan) -> str | None:
    for d in plan.template.properties.distribute:
        target = getattr(d, "imageId", None) or getattr(d, "galleryImageId", None)
        if target and (match := _RG_IN_ID.search(target)):
            return match.group(1)
    return None


class Backend(Protocol):
    """The build steps, in AIB's order. Each is idempotent; each returns small JSON for XCom, or raises Pending
    while long operations it started run."""

    def resolve_source(self) -> dict[str, Any]: ...
    def prepare_staging(self) -> dict[str, Any]: ...
    def provision(self, source: dict[str, Any]) -> dict[str, Any]: ...
    def customize(self, step: Step) -> dict[str, Any]: ...
    def validate(self, step: Step) -> dict[str, Any]: ...
    def generalize(self) -> dict[str, Any]: ...
    def capture(self) -> dict[str, Any]: ...
    def distribute(self, step: Step, source: dict[str, Any]) -> dict[str, Any]: ...
    def cleanup(self, *, keep_vm: bool) -> dict[str, Any]: ...


class Captured(Protocol):
    """What a Builder hands a Publisher of another family: the captured image."""

    image_kind: dict[str, str]  # osType, hyperVGeneration

    def fixed_vhd(self, what: str) -> AbstractContextManager[Path]:
        """The captured image as a fixed VHD, held (locked) while the context lasts."""


class SourceResolver(Protocol):
    def resolve(self, source: Any) -> dict[str, Any]:
        """The template's source (model or JSON) at its exact version: {type, id, exactVersion, parents, ...}."""

    def latest(self, source: dict[str, Any]) -> tuple[str | None, Provenance | None]:
        """The exact version the source resolves to now, and its provenance if Goldsmith published it."""


def sources_for(backend: str, *, home: Path, conn_id: str | None = None, location: str | None = None) -> SourceResolver:
    """The source resolver of a template's backend (`goldsmith.backend`: local or azure)."""
    return load(SOURCES, backend)(home=home, conn_id=conn_id, location=location)


def azure_vhd_target(template: ImageTemplate) -> Any | None:
    """A local build whose VHD target is a blob URL publishes to Azure (goldsmith.azure.publish)."""
    return next((d for d in template.properties.distribute
                 if d.type == "VHD" and (d.uri or "").startswith(("https://", "http://"))), None)


def backend_name(template: ImageTemplate, options: GoldsmithOptions) -> str:
    """The BACKENDS name that builds `template`: its backend, or a composition of builder and publishers."""
    return "local+azure" if options.backend == "local" and azure_vhd_target(template) else options.backend


def backend_for(build: Build) -> Backend:
    name = backend_name(build.plan.template, build.plan.options)
    if name not in BACKENDS:
        raise BuildError(f"backend '{name}' is not available in this installation yet")
    return load(BACKENDS, name)(build)

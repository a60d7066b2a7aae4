"""The build plan: a validated template, normalized and frozen, with the build's steps and a content digest.

The digest covers what decides the image: the normalized AIB document and the checksums of every script and
file it references. Lineage records it, and a scheduled rebuild with the same digest and the same source version
has nothing new to build.
"""

from __future__ import annotations

import hashlib
import json
import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict

from goldsmith.local.vmsizes import VmSizeError, vm_size
from goldsmith.template import model as m
from goldsmith.template.loader import LoadedTemplate, Problem, TemplateError

# Envelope fields that don't change what is built.
_NOT_DIGESTED = {"apiVersion", "dependsOn", "name", "type", "id", "systemData"}
DEFAULT_BUILD_TIMEOUT_MINUTES = 240  # AIB: 0 or omitted means 4 hours


@dataclass(frozen=True)
class Step:
    """One build task: `group` is the TaskGroup (customize, validate, distribute), `task_id` its full id."""

    group: str
    index: int
    name: str
    item: Any  # the customizer, validator or distributor model

    @property
    def task_id(self) -> str:
        return f"{self.group}.{self.name}" if self.group == "distribute" else f"{self.group}.{self.index}_{self.name}"

    @property
    def local_id(self) -> str:
        return self.task_id.split(".", 1)[1]


def _slug(name: str | None, fallback: str) -> str:
    """Airflow task ids allow letters, digits, '-', '_' and '.'; '.' separates task groups."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name or fallback).strip("_")[:200] or fallback


def customize_steps(template: m.ImageTemplate) -> list[Step]:
    return [Step("customize", i, _slug(c.name, c.type.lower()), c) for i, c in enumerate(template.properties.customize)]


def validate_steps(template: m.ImageTemplate) -> list[Step]:
    v = template.properties.validate_
    return [Step("validate", i, _slug(c.name, c.type.lower()), c) for i, c in enumerate(v.inVMValidations if v else [])]


def distribute_steps(template: m.ImageTemplate) -> list[Step]:
    return [Step("distribute", i, d.runOutputName, d) for i, d in enumerate(template.properties.distribute)]


def backend_problems(loaded: LoadedTemplate) -> list[Problem]:
    """What the chosen backend can't build, found before any VM starts."""
    problems = []
    if loaded.options.backend == "local":
        props = loaded.template.properties
        windows = [(f"properties.customize[{i}].type", c.type) for i, c in enumerate(props.customize)
                   if c.type in m.WINDOWS_ONLY_CUSTOMIZERS]
        if props.validate_:
            windows += [(f"properties.validate.inVMValidations[{i}].type", v.type)
                        for i, v in enumerate(props.validate_.inVMValidations) if v.type == "PowerShell"]
        problems += [
            Problem(loaded.where(path), f"'{kind}' needs a Windows build VM and the local backend builds Linux "
                                        "images: set \"goldsmith\": {\"backend\": \"azure\"} in the template")
            for path, kind in windows
        ]
        profile = props.vmProfile
        try:
            vm_size(profile.vmSize if profile else None)
        except VmSizeError as e:
            problems.append(Problem(loaded.where("properties.vmProfile.vmSize"), str(e).removeprefix(
                "vmProfile.vmSize ")))
    return problems


class BuildPlan(BaseModel):
    """Immutable and JSON-serializable: the `plan` task pushes it to XCom, later tasks read it back."""

    model_config = ConfigDict(frozen=True)

    name: str
    source_file: str
    template: m.ImageTemplate
    options: m.GoldsmithOptions
    checksums: dict[str, str]  # uri -> sha256 of every referenced script and file
    digest: str

    @property
    def build_timeout_minutes(self) -> int:
        return self.template.properties.buildTimeoutInMinutes or DEFAULT_BUILD_TIMEOUT_MINUTES

    @property
    def error_handling(self) -> m.ErrorHandling:
        return self.template.properties.errorHandling or m.ErrorHandling()

    def customize_steps(self) -> list[Step]:
        return customize_steps(self.template)

    def validate_steps(self) -> list[Step]:
        return validate_steps(self.template)

    def distribute_steps(self) -> list[Step]:
        return distribute_steps(self.template)


def referenced_uris(template: m.ImageTemplate) -> list[tuple[str, str]]:
    """(uri, declared sha256 or '') of every script and file the build downloads, in template order."""
    props = template.properties
    items: list[Any] = list(props.customize)
    if props.validate_:
        items += props.validate_.inVMValidations
    if props.optimize and props.optimize.workload and props.optimize.workload.scriptUri:
        items.append(props.optimize.workload)
    out = []
    for item in items:
        uri = getattr(item, "scriptUri", None) or getattr(item, "sourceUri", None)
        if uri:
            out.append((uri, item.sha256Checksum))
    return out


def sha256_of_uri(uri: str) -> str:
    if uri.startswith("file://"):
        return hashlib.sha256(Path(uri.removeprefix("file://")).read_bytes()).hexdigest()
    with urllib.request.urlopen(uri, timeout=60) as response:  # noqa: S310 - http(s) and file only, checked below
        return hashlib.sha256(response.read()).hexdigest()


def make_plan(loaded: LoadedTemplate, *, checksum: Callable[[str], str] = sha256_of_uri) -> BuildPlan:
    """Freezes a loaded template into a plan; reads every referenced script to checksum it.

    A declared `sha256Checksum` is taken as the file's checksum (the build verifies it when it downloads);
    otherwise the file is read now, so that a changed script changes the digest.
    """
    problems = backend_problems(loaded)
    checksums: dict[str, str] = {}
    for uri, declared in referenced_uris(loaded.template):
        if not uri.startswith(("file://", "http://", "https://")):
            problems.append(Problem("", f"'{uri}': only file://, http:// and https:// sources are supported"))
            continue
        try:
            checksums[uri] = declared.lower() if declared else checksum(uri)
        except OSError as e:
            problems.append(Problem("", f"can't read '{uri}' to checksum it: {getattr(e, 'reason', None) or e}"))
    if problems:
        raise TemplateError(loaded.path, problems)
    template = loaded.template
    document = template.model_dump(mode="json", by_alias=True, exclude_none=True, exclude=_NOT_DIGESTED)
    canonical = json.dumps(
        {"template": document, "backend": loaded.options.backend, "checksums": checksums},
        sort_keys=True, separators=(",", ":"),
    )
    return BuildPlan(
        name=loaded.name,
        source_file=str(loaded.path),
        template=template,
        options=loaded.options,
        checksums=checksums,
        digest="sha256:" + hashlib.sha256(canonical.encode()).hexdigest(),
    )

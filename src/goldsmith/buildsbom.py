"""The SBOM of a build, as both backends make it before generalizing: rendered once from the build VM's
inventory, kept in the run's record (`runoutputs.document_path`, shared by every worker), checked against the
template's SBOM policy; each distribute task then refers to it (an SbomRef) and stores it with its artifact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

from goldsmith import runoutputs, sbom, updates
from goldsmith.core import Build, BuildError


def path(build: Build) -> Path:
    return runoutputs.document_path(build.plan.name, build.run_id, sbom.FILE_NAME)


def record(build: Build, collect: Callable[[], sbom.Inventory], guest_aliases: Mapping[str, str] | None = None) -> None:
    """Collect (once per run: a retry reuses the document), store, and apply the policy; a policy failure is a
    BuildError listing every offending package."""
    target = path(build)
    if not target.exists():
        try:
            inventory = collect()
        except sbom.SbomError as e:
            raise BuildError(f"generalize: {e}") from None
        doc = sbom.cyclonedx(inventory, name=build.plan.name, version=build.run_id, serial_key=build.run_key,
                             scripts=build.plan.checksums)
        runoutputs.write_document(build.plan.name, build.run_id, sbom.FILE_NAME, sbom.dumps(doc))
    doc = json.loads(target.read_bytes())
    build.log.info("SBOM: %d packages, kept in %s", len(sbom.packages(doc)), target)
    try:
        problems, warnings = updates.gate(doc, build.plan.options.sbom, updates.http_fetch(guest_aliases))
    except updates.UpdatesError as e:
        raise BuildError(f"generalize: the SBOM policy's update check could not read an archive: {e}") from None
    for warning in warnings:
        build.log.warning("%s", warning)
    if problems:
        raise BuildError("generalize: the image fails its SBOM policy (goldsmith.sbom):\n  " + "\n  ".join(problems))


def ref(build: Build) -> dict[str, Any] | None:
    """The SbomRef of the run's SBOM (its uri: the run's copy), or None when the build made none."""
    target = path(build)
    return sbom.ref_for(target.read_bytes(), target.as_uri()).as_dict() if target.exists() else None


def ssh_runner(comm: Any) -> Callable[[str], tuple[int | None, str]]:
    """A communicator as `sbom.collect_linux` runs commands: (exit code, whole output)."""
    def run(command: str) -> tuple[int | None, str]:
        lines: list[str] = []
        return comm.run(command, on_line=lines.append).exit_code, "\n".join(lines)
    return run

"""What changed between two image versions: packages (from their SBOMs), source version, template and scripts.

Artifacts are found as lineage finds them (`lineage.artifacts()`: the local gallery and the run outputs); each
one built with an SBOM carries `sbom` {format, sha256, packages, uri}. A document is read back only if its
sha256 still matches the provenance, so a diff never reports on a file changed after the build.
"""

from __future__ import annotations

import hashlib
import json
import urllib.parse
from pathlib import Path
from typing import Any, Mapping

from goldsmith import lineage, runoutputs, sbom


class ChangesError(Exception):
    """An SBOM that is missing, unreadable or not the one the build recorded."""


def load_sbom(artifact: Mapping[str, Any]) -> dict[str, Any]:
    ref = artifact.get("sbom")
    if not ref:
        raise ChangesError(f"{artifact['id']} has no SBOM: it was built before Goldsmith made SBOMs, or its "
                           "build VM had no package database")
    path = Path(urllib.parse.unquote(urllib.parse.urlsplit(ref["uri"]).path))
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ChangesError(f"the SBOM of {artifact['id']} is unreadable: {e}") from None
    if hashlib.sha256(data).hexdigest() != ref["sha256"]:
        raise ChangesError(f"{path} is not the SBOM built with {artifact['id']}: its sha256 differs from the "
                           f"provenance ({ref['sha256'][:12]}…); it was changed after the build")
    return json.loads(data)


def previous(artifact: Mapping[str, Any], found: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    """The newest artifact of the same template and target kind built before `artifact` (for a gallery version,
    of the same image definition)."""
    def target(a: Mapping[str, Any]) -> str:
        return lineage.image_uri(a["id"]) if a["kind"] != "vhd" else "vhd"

    earlier = [a for a in found.values() if a["template"] == artifact["template"] and a["kind"] == artifact["kind"]
               and target(a) == target(artifact) and a["createdTime"] < artifact["createdTime"]]
    return dict(max(earlier, key=lambda a: a["createdTime"])) if earlier else None


def describe(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The changes from artifact `old` to `new`, one a line; packages need both SBOMs."""
    lines = [f"{old['id']} ({old['runId']}) → {new['id']} ({new['runId']})"]
    so, sn = old.get("source") or {}, new.get("source") or {}
    if (so.get("id"), so.get("exactVersion")) != (sn.get("id"), sn.get("exactVersion")):
        lines.append(f"source: {so.get('id')} {so.get('exactVersion')} → {sn.get('id')} {sn.get('exactVersion')}")
    if old.get("templateDigest") != new.get("templateDigest"):
        lines.append(f"template and scripts: {str(old.get('templateDigest'))[:19]} → {str(new.get('templateDigest'))[:19]}")
    try:
        a, b = load_sbom(old), load_sbom(new)
    except ChangesError as e:
        return lines + [f"packages: not compared ({e})"]
    sa, sb = sbom.scripts(a), sbom.scripts(b)
    lines += [f"script {'added' if u not in sa else 'removed' if u not in sb else 'changed'}: {u}"
              for u in sorted(sa.keys() | sb.keys()) if sa.get(u) != sb.get(u)]
    return lines + (sbom.diff(a, b).lines() or ["packages: unchanged"])


def since_previous(artifact_id: str, home: Path | None = None) -> list[str]:
    """What the distribute log ends with: the changes from the previous version of this target."""
    found = lineage.artifacts(home)
    artifact = found.get(artifact_id.lower())
    if artifact is None:
        return []
    before = previous(artifact, found)
    if before is None:
        return [f"{artifact['id']}: the first version of this target, nothing to compare"]
    return describe(before, artifact)


def last_built_sbom(template: str, home: Path | None = None) -> tuple[str, dict[str, Any]] | None:
    """(run id, SBOM) of the template's newest successful build, from the run's record; None if that build
    made none (or there is no successful build)."""
    last = next((r for r in reversed(runoutputs.list_results(template, home=home)) if r["succeeded"]), None)
    if last is None:
        return None
    path = runoutputs.document_path(template, last["runId"], sbom.FILE_NAME, home=home)
    return (last["runId"], json.loads(path.read_bytes())) if path.exists() else None

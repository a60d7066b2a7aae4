"""What the local publishers published on this host, with its provenance: the local gallery's versions and
managed images (provenance in their metadata) and VHD files (provenance in their run outputs).

Lineage reads these (through the registry) as it reads the Azure publishers' artifacts.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from goldsmith import sbom
from goldsmith.local.gallery import LocalGallery
from goldsmith.provenance import Artifact, Provenance


def artifacts(home: Path, templates: list[Any]) -> list[Artifact]:
    found = []
    for entry in LocalGallery(home / "gallery").list():
        for meta in entry.get("versions", [entry] if "provenance" in entry else []):
            provenance = Provenance.from_record(meta["provenance"])
            if provenance.sbom:  # the document lies beside the artifact's disk
                provenance = replace(provenance, sbom={
                    **provenance.sbom, "uri": Path(meta["path"]).with_name(sbom.FILE_NAME).as_uri()})
            found.append(Artifact(meta["id"], "galleryImageVersion" if "version" in meta else "managedImage",
                                  meta.get("version"), meta["createdTime"], provenance))
    for template_dir in sorted((home / "runs").glob("*/")):
        for outputs in template_dir.glob("*/outputs"):
            for path in outputs.glob("[!.]*.json"):
                output = json.loads(path.read_text())
                uri, extra = output["properties"].get("artifactUri"), output["goldsmith"]
                if output["properties"].get("artifactId") or not uri:
                    continue  # gallery artifacts are listed with their publisher's records
                found.append(Artifact(uri, "vhd", None, extra["recordedTime"], Provenance.from_record({
                    "template": template_dir.name, "dagId": template_dir.name, "runId": extra["runId"],
                    "templateDigest": extra.get("digest"), "source": extra.get("source") or {},
                    "parents": extra.get("parents") or [], "sbom": extra.get("sbom")})))
    return found

"""Where an image came from, in one model that every record of it is rendered from.

A build's provenance is its source (type, id, exact version), the template and its digest, the DAG run and
the parents (the artifacts it was built from: the source image, unless that is a platform image). It is
written to the local gallery's metadata (`record`), to run outputs (`output_extra`), to Azure resource tags
(`tags`, read back by `from_tags`: an Azure gallery version carries its own lineage), and to asset events
(`event_extra`). Each rendering holds only these fields: no parameter values, no secrets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

# Azure tags (names <= 512, values <= 256 characters): an ARM id fits in a value.
TAG_TEMPLATE, TAG_DIGEST, TAG_DAG, TAG_RUN, TAG_SOURCE, TAG_SOURCE_VERSION, TAG_SOURCE_TYPE = (
    "goldsmith.template", "goldsmith.templateDigest", "goldsmith.dagId", "goldsmith.runId", "goldsmith.source",
    "goldsmith.sourceVersion", "goldsmith.sourceType")


@dataclass(frozen=True)
class SourceRef:
    """The exact source image a build used."""

    type: str  # PlatformImage | ManagedImage | SharedImageVersion
    id: str | None
    exactVersion: str | None = None

    def json(self) -> dict[str, Any]:
        return {"type": self.type, "id": self.id, "exactVersion": self.exactVersion}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SourceRef:
        return cls(data.get("type") or "", data.get("id"), data.get("exactVersion"))

    @property
    def parents(self) -> tuple[str, ...]:
        """The artifact a build from this source descends from: the image itself, unless it is a platform image
        (which is not an artifact anyone here built)."""
        return (self.id,) if self.id and self.type != "PlatformImage" else ()


@dataclass(frozen=True)
class Provenance:
    source: SourceRef
    template: str
    templateDigest: str
    dagId: str
    runId: str
    parents: tuple[str, ...] = field(default=())
    # The build's SBOM reference (sha256, packages, uri: sbom.SbomRef as JSON), when the build made one.
    sbom: Mapping[str, Any] | None = field(default=None, compare=False)
    # The cached step layers the image was built from instead of running those steps (local/layers.py).
    layers: tuple[Mapping[str, Any], ...] = field(default=(), compare=False)

    @classmethod
    def of(cls, source: Mapping[str, Any], *, template: str, digest: str, dag_id: str, run_id: str,
           sbom: Mapping[str, Any] | None = None, layers: Sequence[Mapping[str, Any]] = ()) -> Provenance:
        """A build's provenance from its resolved source (the plan's `source` XCom)."""
        ref = SourceRef.from_json(source)
        return cls(ref, template, digest, dag_id, run_id, tuple(source.get("parents") or ref.parents), sbom,
                   tuple(layers))

    def record(self) -> dict[str, Any]:
        """As the local gallery's metadata holds it (`provenance`)."""
        return {"source": self.source.json(), "template": self.template, "templateDigest": self.templateDigest,
                "dagId": self.dagId, "runId": self.runId, "parents": list(self.parents),
                **({"sbom": dict(self.sbom)} if self.sbom else {}),
                **({"layers": [dict(x) for x in self.layers]} if self.layers else {})}

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> Provenance:
        return cls(SourceRef.from_json(data.get("source") or {}), data["template"], data.get("templateDigest") or "",
                   data.get("dagId") or "", data["runId"], tuple(data.get("parents") or ()), data.get("sbom"),
                   tuple(data.get("layers") or ()))

    def output_extra(self) -> dict[str, Any]:
        """The `goldsmith` part of a run output."""
        return {"digest": self.templateDigest, "source": self.source.json(), "parents": list(self.parents),
                **({"sbom": dict(self.sbom)} if self.sbom else {})}

    def tags(self) -> dict[str, str]:
        """As Azure resource tags on a published artifact (parents follow from the source)."""
        return {TAG_TEMPLATE: self.template, TAG_DIGEST: self.templateDigest, TAG_DAG: self.dagId,
                TAG_RUN: self.runId, TAG_SOURCE: self.source.id or "", TAG_SOURCE_VERSION: self.source.exactVersion or "",
                TAG_SOURCE_TYPE: self.source.type}

    @classmethod
    def from_tags(cls, tags: Mapping[str, str] | None) -> Provenance | None:
        """The provenance an artifact's tags hold; None for an artifact Goldsmith did not publish."""
        tags = tags or {}
        if not (tags.get(TAG_TEMPLATE) and tags.get(TAG_RUN)):
            return None
        source_id = tags.get(TAG_SOURCE) or None
        source_type = tags.get(TAG_SOURCE_TYPE) or _source_type(source_id)
        ref = SourceRef(source_type, source_id, tags.get(TAG_SOURCE_VERSION) or None)
        return cls(ref, tags[TAG_TEMPLATE], tags.get(TAG_DIGEST) or "", tags.get(TAG_DAG) or tags[TAG_TEMPLATE],
                   tags[TAG_RUN], ref.parents)

    def event_extra(self) -> dict[str, Any]:
        """The provenance part of an asset event's extra."""
        return {"templateDigest": self.templateDigest, "dagRunId": self.runId, "parents": list(self.parents)}


def _source_type(source_id: str | None) -> str:
    """For tags written before `goldsmith.sourceType`: the kind of source an id names."""
    if not source_id or not source_id.startswith("/"):
        return "PlatformImage"
    return "SharedImageVersion" if "/galleries/" in source_id.lower() else "ManagedImage"


@dataclass(frozen=True)
class Artifact:
    """A published artifact, as a publisher lists it for lineage."""

    id: str  # an ARM id, or the VHD's URI
    kind: str  # galleryImageVersion | managedImage | vhd
    version: str | None
    createdTime: str
    provenance: Provenance

    def json(self) -> dict[str, Any]:
        p = self.provenance
        return {"id": self.id, "kind": self.kind, "version": self.version, "template": p.template,
                "dagId": p.dagId, "runId": p.runId, "templateDigest": p.templateDigest,
                "source": p.source.json(), "parents": list(p.parents), "createdTime": self.createdTime,
                "sbom": dict(p.sbom) if p.sbom else None}

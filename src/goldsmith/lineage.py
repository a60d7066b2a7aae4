"""Lineage: images as Airflow Assets, the build history, and the ancestry of every artifact.

An image definition, a managed image or a VHD location is an Asset; each build that publishes to it emits an
asset event. A template whose source is another image is scheduled on that image's asset, so a new base version
rebuilds everything built on it, transitively. URIs are normalized (ARM ids are case-insensitive; Airflow's
asset URIs are not), so two templates that spell an id differently still meet on one asset.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from goldsmith.secrets import strip_uri
from goldsmith.settings import goldsmith_home
from goldsmith.template import model as m

_VERSION_SUFFIX = re.compile(r"/versions/[^/]+$", re.IGNORECASE)


def image_uri(arm_id: str) -> str:
    """The asset URI of a managed image or gallery image definition (a version id names its definition)."""
    return "arm:" + _VERSION_SUFFIX.sub("", arm_id.strip()).rstrip("/").lower()


def image_version(artifact_id: str | None) -> str | None:
    """The version (x.y.z) a gallery image version id names; None for managed images and VHDs."""
    match = _VERSION_SUFFIX.search(artifact_id or "")
    return match.group().rpartition("/")[2] if match else None


def source_uri(source: Any) -> str:
    if source.type == "PlatformImage":
        return f"platform-image:{source.publisher}/{source.offer}/{source.sku}".lower()
    return image_uri(source.imageId if source.type == "ManagedImage" else source.imageVersionId)


def target_uri(distributor: Any, template_name: str) -> str:
    if distributor.type == "SharedImage":
        return image_uri(distributor.galleryImageId)
    if distributor.type == "ManagedImage":
        return image_uri(distributor.imageId)
    # An asset URI is shown and sent everywhere: a SAS token or a user:password@ stays out of it.
    return strip_uri(distributor.uri) if distributor.uri else f"vhd:{template_name}/{distributor.runOutputName}"


def follows_source(template: m.ImageTemplate, options: m.GoldsmithOptions) -> bool:
    """Whether a new version of the source should rebuild this image.

    Gallery sources that float (`versions/latest`) and managed images (republished in place) do; a pinned
    gallery version never changes; platform images change outside Goldsmith, so only when the template asks
    for AIB's SourceImage trigger (`"goldsmith": {"sourceTrigger": true}`).
    """
    source = template.properties.source
    if source.type == "SharedImageVersion":
        return source.imageVersionId.rstrip("/").lower().endswith("/versions/latest")
    if source.type == "ManagedImage":
        return True
    return options.sourceTrigger


# --- ancestry of built artifacts -------------------------------------------------------------------------------

def artifacts(home: Path | None = None) -> dict[str, dict[str, Any]]:
    """Every artifact Goldsmith built on this host, by lower-cased id: gallery versions, managed images and
    VHDs, each with `id`, `kind`, `template`, `runId`, `version`, `source` and `parents`.

    Provenance lives with the artifacts (gallery metadata, run outputs), not in Airflow's database, so
    lineage survives the loss of that database.
    """
    from goldsmith.local.gallery import LocalGallery
    from goldsmith.sbom import FILE_NAME as SBOM_FILE

    home = home or goldsmith_home()
    found: dict[str, dict[str, Any]] = {}
    for entry in LocalGallery(home / "gallery").list():
        for meta in entry.get("versions", [entry] if "provenance" in entry else []):
            prov = meta["provenance"]
            found[meta["id"].lower()] = {
                "id": meta["id"], "kind": "galleryImageVersion" if "version" in meta else "managedImage",
                "version": meta.get("version"), "template": prov["template"], "dagId": prov["dagId"],
                "runId": prov["runId"], "templateDigest": prov["templateDigest"], "source": prov["source"],
                "parents": prov["parents"], "createdTime": meta["createdTime"],
                "sbom": {**prov["sbom"], "uri": Path(meta["path"]).with_name(SBOM_FILE).as_uri()} if prov.get("sbom") else None,
            }
    for template_dir in sorted((home / "runs").glob("*/")):
        for run_dir in template_dir.glob("*/outputs"):
            for path in run_dir.glob("[!.]*.json"):
                output = json.loads(path.read_text())
                uri, extra = output["properties"].get("artifactUri"), output["goldsmith"]
                if output["properties"].get("artifactId") or not uri:
                    continue  # gallery artifacts are listed above, with their full metadata
                found[uri.lower()] = {
                    "id": uri, "kind": "vhd", "version": None, "template": template_dir.name,
                    "dagId": template_dir.name, "runId": extra["runId"], "templateDigest": extra.get("digest"),
                    "source": extra.get("source", {}), "parents": extra.get("parents", []),
                    "createdTime": extra["recordedTime"], "sbom": extra.get("sbom"),
                }
    return found


def find(query: str, found: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """An artifact by id, or by template name with an optional `@version` (default: its newest artifact)."""
    if query.lower() in found:
        return found[query.lower()]
    name, _, version = query.partition("@")
    candidates = sorted((a for a in found.values() if a["template"] == name and (not version or a["version"] == version)),
                        key=lambda a: (a["createdTime"], a["kind"] != "galleryImageVersion"))
    if not candidates:
        known = sorted({a["template"] for a in found.values()})
        raise LookupError(f"no artifact '{query}': give an artifact id, or a template name (built: "
                          f"{', '.join(known) or 'none'}) with an optional @version")
    return candidates[-1]


def ancestry(artifact: dict[str, Any], found: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ancestors (what it was built from, up to the platform image), descendants (what was built from it,
    transitively) and siblings (the other targets of the same run)."""
    # Iterative walks with a visited set: any number of generations, and a cycle in damaged records ends.
    def up(start: dict[str, Any]) -> list[dict[str, Any]]:
        chain, stack, seen = [], [start], {start["id"].lower()}
        while stack:
            node = stack.pop()
            for parent in reversed(node["parents"]):
                if parent.lower() in seen:
                    continue
                seen.add(parent.lower())
                parent_node = found.get(parent.lower())
                chain.append(parent_node or {"id": parent, "kind": "external"})
                if parent_node:
                    stack.append(parent_node)
            if not node["parents"] and node.get("source", {}).get("type") == "PlatformImage":
                chain.append({"id": node["source"]["id"], "kind": "platformImage"})
        return chain

    def down(start_id: str) -> list[dict[str, Any]]:
        children_of: dict[str, list[dict[str, Any]]] = {}
        for a in found.values():
            for p in a["parents"]:
                children_of.setdefault(p.lower(), []).append(a)
        out, stack, seen = [], [start_id.lower()], {start_id.lower()}
        while stack:
            for child in children_of.get(stack.pop(), []):
                if child["id"].lower() not in seen:
                    seen.add(child["id"].lower())
                    out.append(child)
                    stack.append(child["id"].lower())
        return out

    siblings = [a for a in found.values() if a["runId"] == artifact["runId"] and a["template"] == artifact["template"]
                and a["id"] != artifact["id"]]
    return {"artifact": artifact, "ancestors": up(artifact), "descendants": down(artifact["id"]), "siblings": siblings}


def to_dot(result: dict[str, Any]) -> str:
    """A Graphviz digraph: source → image edges, the queried artifact highlighted."""
    nodes = [result["artifact"], *result["ancestors"], *result["descendants"], *result["siblings"]]

    def label(a: dict[str, Any]) -> str:
        name = a["id"].rsplit("/", 3) if a["kind"] == "galleryImageVersion" else [a["id"].rsplit("/", 1)[-1]]
        head = "/".join(name[-3:]) if a["kind"] == "galleryImageVersion" else name[-1]
        return f"{head}\\n{a['kind']}" + (f"\\n{a['template']}" if a.get("template") else "")

    lines = ["digraph lineage {", "  rankdir=LR;", "  node [shape=box, style=rounded];"]
    seen = set()
    for a in nodes:
        if a["id"] in seen:
            continue
        seen.add(a["id"])
        style = ", style=\"rounded,bold\", color=blue" if a is result["artifact"] else ""
        lines.append(f"  {_q(a['id'])} [label={_q(label(a))}{style}];")
    for a in nodes:
        parents = a.get("parents") or ([a["source"]["id"]] if a.get("source", {}).get("type") == "PlatformImage" else [])
        for p in parents:
            lines.append(f"  {_q(p)} -> {_q(a['id'])};")
    lines.append("}")
    return "\n".join(dict.fromkeys(lines))


def _q(text: str) -> str:
    """A DOT string; `\\n` in labels stays a line break."""
    return '"' + text.replace('"', '\\"') + '"'


def outdated(home: Path | None = None) -> list[dict[str, Any]]:
    """Templates whose last successful build used a source version that is no longer the newest one."""
    from goldsmith import runoutputs
    from goldsmith.triggers import latest_source_version

    home = home or goldsmith_home()
    stale = []
    for template_dir in sorted(p for p in (home / "runs").glob("*/") if p.is_dir()):
        built = next((r for r in reversed(runoutputs.list_results(template_dir.name, home=home)) if r["succeeded"]),
                     None)
        source = built and built["source"]
        if not source or not source.get("id"):
            continue
        try:
            newest = latest_source_version(_source_spec(source), home)
        except Exception:  # a source that can't be resolved now is reported by the build, not here
            continue
        if newest != source.get("exactVersion"):
            _, outputs = runoutputs.list_outputs(template_dir.name, built["runId"], home=home)
            stale.append({"template": template_dir.name, "dagId": template_dir.name, "runId": built["runId"],
                          "source": source["id"], "builtFrom": source.get("exactVersion"), "newest": newest,
                          "artifacts": [o["properties"].get("artifactId") or o["properties"].get("artifactUri")
                                        for o in outputs]})
    return stale


def _source_spec(source: dict[str, Any]) -> dict[str, Any]:
    """The source as the resolver takes it, from the exact id recorded at build time."""
    if source["type"] == "PlatformImage":
        publisher, offer, sku, _ = source["id"].split(":")
        return {"type": "PlatformImage", "publisher": publisher, "offer": offer, "sku": sku}
    if source["type"] == "ManagedImage":
        return {"type": "ManagedImage", "imageId": source["id"]}
    return {"type": "SharedImageVersion", "imageVersionId": _VERSION_SUFFIX.sub("/versions/latest", source["id"])}


# --- OpenLineage -----------------------------------------------------------------------------------------------

def openlineage_dataset(uri: str) -> Any:
    """An asset URI as an OpenLineage dataset: the scheme is the namespace (`arm`, `platform-image`, `file`)."""
    from openlineage.client.event_v2 import Dataset

    scheme, _, rest = uri.partition(":")
    return Dataset(namespace=scheme, name=rest.removeprefix("//") or uri)


def openlineage_for_distribution(source_uri_: str, target_uri_: str, output: dict[str, Any],
                                 source: dict[str, Any], digest: str) -> Any:
    """Source image in, distribution target out, and a run facet with the version details."""
    import attr
    from airflow.providers.openlineage.extractors import OperatorLineage
    from openlineage.client.facet_v2 import RunFacet

    @attr.define
    class GoldsmithImageRunFacet(RunFacet):
        runOutputName: str
        artifactId: str | None
        artifactUri: str | None
        sourceId: str | None
        sourceExactVersion: str | None
        templateDigest: str
        sbomSha256: str | None = None
        sbomPackages: int | None = None

    sbom = output.get("sbom") or {}
    facet = GoldsmithImageRunFacet(
        runOutputName=output["runOutputName"], artifactId=output.get("artifactId"),
        artifactUri=output.get("artifactUri"), sourceId=source.get("id"),
        sourceExactVersion=source.get("exactVersion"), templateDigest=digest,
        sbomSha256=sbom.get("sha256"), sbomPackages=sbom.get("packages"))
    return OperatorLineage(inputs=[openlineage_dataset(source_uri_)], outputs=[openlineage_dataset(target_uri_)],
                           run_facets={"goldsmith_image": facet})

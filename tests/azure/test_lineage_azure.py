"""Lineage, `outdated` and the source AssetWatcher see Azure: an image the azure backend published to a gallery
(in the ARM test double) is read back through the registry's publishers and source resolvers, its provenance
from its tags.

One real azure build (the base image); the derived template's history is recorded as its operator would.
"""

from __future__ import annotations

from pathlib import Path

from test_backend import DEBIAN, LOCATION, env, images, make_build, run_build_with_retries  # noqa: F401 (fixtures)

from goldsmith import lineage, runoutputs
from goldsmith.azure.backend import AzureBackend
from goldsmith.triggers import SourceVersionTrigger


def test_lineage_outdated_and_the_source_watcher_read_the_azure_gallery(env, arm_double, images, tmp_path: Path):  # noqa: F811
    home = tmp_path / "home"  # GOLDSMITH_HOME (the env fixture)
    definition = f"{images}/providers/Microsoft.Compute/galleries/golden/images/linux"
    base = run_build_with_retries(AzureBackend(make_build(tmp_path, {"source": DEBIAN, "distribute": [
        {"type": "SharedImage", "runOutputName": "sig", "galleryImageId": definition}]}, name="base")))
    v1 = base["sig"]["artifactId"]
    make_build(tmp_path, {  # writes the derived template: a rebuild whenever the base gets a new version
        "source": {"type": "SharedImageVersion", "imageVersionId": f"{definition}/versions/latest"},
        "distribute": [{"type": "SharedImage", "runOutputName": "sig", "galleryImageId": definition}]},
        name="app", goldsmith={"backend": "azure", "sourceTrigger": True, "sourcePollSeconds": 10})
    templates = lineage.load_templates(tmp_path)
    assert sorted(t.name for t in templates) == ["app", "base"]

    # Lineage reads the gallery version back from ARM, its provenance from its tags.
    found = lineage.artifacts(home, templates)
    artifact = lineage.find("base@0.0.1", found)
    assert artifact["id"].lower() == v1.lower() and artifact["kind"] == "galleryImageVersion"
    assert artifact["dagId"] == "base" and artifact["source"]["type"] == "PlatformImage"
    result = lineage.ancestry(artifact, found)
    assert [(a["id"], a["kind"]) for a in result["ancestors"]] == [("Debian:debian-12:12:0.20250305.2040",
                                                                   "platformImage")]
    assert lineage.find(v1, found) is artifact

    # The derived template was built from 0.0.1: up to date, and the watcher stays quiet (Goldsmith published it).
    [app] = [t for t in templates if t.name == "app"]
    runoutputs.record_result("app", "r1", succeeded=True, digest="sha256:d",
                             source={"type": "SharedImageVersion", "id": v1, "exactVersion": "0.0.1"})
    trigger = SourceVersionTrigger.for_template(app, home)
    assert trigger.serialize()[1] == {
        "template": "app", "source": {"type": "SharedImageVersion", "imageVersionId": f"{definition}/versions/latest"},
        "home": str(home), "poll_seconds": 10, "backend": "azure", "conn_id": "azure_default", "location": LOCATION}
    assert trigger.check() is None
    assert lineage.outdated(home, templates) == []

    # A version published outside Goldsmith: the watcher fires once, and `outdated` names the derived template.
    v2 = f"{definition}/versions/0.0.2"
    arm_double.seed(v2, {"location": LOCATION, "properties": {"storageProfile": {"source": {"id": v1}}}})
    assert trigger.check() == "0.0.2"
    assert trigger.check() is None  # announced once
    [stale] = lineage.outdated(home, templates)
    assert (stale["template"], stale["builtFrom"], stale["newest"]) == ("app", "0.0.1", "0.0.2")
    assert v2.lower() not in lineage.artifacts(home, templates)  # no Goldsmith provenance: not in the lineage
    arm_double.keep(v1)

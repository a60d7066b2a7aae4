"""Lineage without VMs: asset URIs, schedules, the source trigger, ancestry queries, skipping unchanged builds.

The gallery is real (files under a temp GOLDSMITH_HOME, disks made with qemu-img); only the builds are skipped.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest
from airflow.sdk import Asset, AssetOrTimeSchedule

from goldsmith import lineage, runoutputs, runpolicy
from goldsmith.dag_factory import build_dags
from goldsmith.local.gallery import LocalGallery
from goldsmith.template.loader import load_template
from goldsmith.template.plan import make_plan
from goldsmith.triggers import MAX_CONSECUTIVE_FAILURES, SourceVersionTrigger

SUB = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/Golden/providers/Microsoft.Compute"
BASE = f"{SUB}/galleries/g/images/base"
PLATFORM = {"type": "PlatformImage", "publisher": "Debian", "offer": "debian-12", "sku": "12", "version": "latest"}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GOLDSMITH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    return path


def publish(home: Path, disk: Path, definition: str, template: str, source: dict, parents: list[str],
            version: str | None = None, dag_id: str | None = None) -> str:
    """`dag_id=""`: a version published outside Goldsmith (no DAG emitted an asset event for it)."""
    record = LocalGallery(home / "gallery").publish_version(
        definition, disk, version=version, source_version=None,
        provenance={"source": source, "template": template, "templateDigest": "sha256:" + "0" * 64,
                    "dagId": template if dag_id is None else dag_id, "runId": f"run-{template}-{version}",
                    "parents": parents},
        run_key=f"{template}/{version}")
    return record.id


def write(folder: Path, name: str, source: dict, **options) -> Path:
    body = {"location": "westeurope", "goldsmith": options, "properties": {
        "source": source, "distribute": [{"type": "SharedImage", "runOutputName": "sig",
                                          "galleryImageId": f"{SUB}/galleries/g/images/{name}"}]}}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(body))
    return path


def test_asset_uris_are_normalized_so_spellings_of_one_id_meet() -> None:
    assert lineage.image_uri(BASE + "/versions/latest") == lineage.image_uri(BASE.upper()) == "arm:" + BASE.lower()
    assert lineage.image_uri(f"{SUB}/images/golden/") == "arm:" + f"{SUB}/images/golden".lower()


def test_derived_templates_are_scheduled_on_their_source_image(tmp_path: Path, home: Path) -> None:
    write(tmp_path, "base", PLATFORM)
    write(tmp_path, "derived", {"type": "SharedImageVersion", "imageVersionId": BASE + "/versions/latest"})
    write(tmp_path, "weekly", {"type": "SharedImageVersion", "imageVersionId": BASE + "/versions/latest"},
          schedule="@weekly", sourceTrigger=True)
    write(tmp_path, "pinned", {"type": "SharedImageVersion", "imageVersionId": BASE + "/versions/1.0.0"})
    dags = build_dags(tmp_path)
    base_asset = dags["base"].task_dict["distribute.sig"].outlets[0]
    assert isinstance(base_asset, Asset) and base_asset.uri == "arm:" + BASE.lower()
    assert dags["derived"].timetable.asset_condition.uri == base_asset.uri
    weekly = dags["weekly"].timetable
    assert isinstance(weekly, AssetOrTimeSchedule)
    watchers = weekly.asset_condition.watchers
    assert [type(w.trigger).__name__ for w in watchers] == ["SourceVersionTrigger"]
    # A pinned version never changes; a platform image without sourceTrigger changes unseen: both on demand only.
    assert type(dags["pinned"].timetable).__name__ == type(dags["base"].timetable).__name__ == "NullTimetable"


def test_source_trigger_fires_once_per_new_version_and_pauses_after_failures(home: Path, disk: Path) -> None:
    source = {"type": "SharedImageVersion", "imageVersionId": BASE + "/versions/latest"}
    publish(home, disk, BASE, "base", PLATFORM, [], "1.0.0", dag_id="")
    runoutputs.record_result("derived", "r1", succeeded=True, digest="d", source={"exactVersion": "1.0.0"})
    trigger = SourceVersionTrigger("derived", source, str(home), poll_seconds=0.01)
    assert trigger.check() is None  # built from the newest version

    publish(home, disk, BASE, "base", PLATFORM, [], "1.0.1", dag_id="")
    assert trigger.check() == "1.0.1"
    assert SourceVersionTrigger("derived", source, str(home)).check() is None  # announced once, even after a restart

    publish(home, disk, BASE, "base", PLATFORM, [], "1.0.2", dag_id="")
    for i in range(MAX_CONSECUTIVE_FAILURES):
        runoutputs.record_result("derived", f"f{i}", succeeded=False, digest="d", source={"exactVersion": "1.0.1"})
    assert trigger.check() is None  # paused, as AIB's trigger is after repeated failures
    runoutputs.record_result("derived", "ok", succeeded=True, digest="d", source={"exactVersion": "1.0.1"})
    assert trigger.check() == "1.0.2"

    publish(home, disk, BASE, "base", PLATFORM, [], "1.0.3", dag_id="base")
    assert trigger.check() is None  # a Goldsmith DAG published it and emitted its asset event already
    publish(home, disk, BASE, "base", PLATFORM, [], "1.0.4", dag_id="")

    async def first_event():
        async for event in trigger.run():
            return event.payload

    assert asyncio.run(asyncio.wait_for(first_event(), 30))["exactVersion"] == "1.0.4"
    assert trigger.serialize() == ("goldsmith.triggers.SourceVersionTrigger", {
        "template": "derived", "source": source, "home": str(home), "poll_seconds": 0.01})


def test_lineage_ancestors_descendants_and_outdated(home: Path, disk: Path) -> None:
    base_v1 = publish(home, disk, BASE, "base", {**PLATFORM, "id": "Debian:debian-12:12:0.1.1", "exactVersion": "0.1.1"},
                      [], "1.0.0")
    golden_def = f"{SUB}/galleries/g/images/golden"
    golden = publish(home, disk, golden_def, "golden",
                     {"type": "SharedImageVersion", "id": base_v1, "exactVersion": "1.0.0"}, [base_v1], "2.0.0")
    runoutputs.record("golden", "run-golden-2.0.0", "vhd", None, "file:///images/golden.vhd", "Succeeded",
                      extra={"digest": "sha256:x", "source": {"id": base_v1}, "parents": [base_v1]})
    runoutputs.record_result("golden", "run-golden-2.0.0", succeeded=True, digest="sha256:x",
                             source={"type": "SharedImageVersion", "id": base_v1, "exactVersion": "1.0.0"})

    found = lineage.artifacts(home)
    result = lineage.ancestry(lineage.find("golden@2.0.0", found), found)
    assert result["artifact"]["id"] == golden
    assert [a["id"] for a in result["ancestors"]] == [base_v1, "Debian:debian-12:12:0.1.1"]
    assert [a["id"] for a in result["siblings"]] == ["file:///images/golden.vhd"]
    below = lineage.ancestry(lineage.find(base_v1, found), found)["descendants"]
    assert sorted(a["id"] for a in below) == sorted([golden, "file:///images/golden.vhd"])
    dot = lineage.to_dot(lineage.ancestry(lineage.find("golden", found), found))
    assert f'"{base_v1}" -> "{golden}";' in dot and dot.startswith("digraph")
    with pytest.raises(LookupError, match="built: base, golden"):
        lineage.find("nope", found)

    assert lineage.outdated(home) == []
    publish(home, disk, BASE, "base", PLATFORM, [], "1.0.1")
    [stale] = lineage.outdated(home)
    assert (stale["template"], stale["builtFrom"], stale["newest"]) == ("golden", "1.0.0", "1.0.1")
    assert "file:///images/golden.vhd" in stale["artifacts"]


def test_unchanged_builds_are_skipped_with_the_reason(tmp_path: Path, home: Path) -> None:
    plan = make_plan(load_template(write(tmp_path, "base", PLATFORM)))
    source = {"type": "PlatformImage", "id": "Debian:debian-12:12:0.1.1", "exactVersion": "0.1.1"}
    unchanged = lambda source: runpolicy.unchanged_since(plan, source, runoutputs.list_results("base"))  # noqa: E731
    assert unchanged(source) is None  # never built
    runoutputs.record_result("base", "r1", succeeded=False, digest=plan.digest, source=source)
    assert unchanged(source) is None  # only failed builds
    runoutputs.record_result("base", "r2", succeeded=True, digest=plan.digest, source=source)
    assert "nothing changed since the successful build r2" in unchanged(source)
    assert unchanged({**source, "exactVersion": "0.1.2"}) is None  # a new source version

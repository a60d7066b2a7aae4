"""The lineage story on a real Airflow (api-server, scheduler, dag-processor, triggerer on PostgreSQL), driven
through the public REST API as a user or a pipeline would.

A base image builds on demand; its gallery version's asset event starts the derived image's build; lineage and
`outdated` read the provenance; an unchanged rebuild is skipped with its reason; a base version published
outside Goldsmith is noticed by the derived DAG's AssetWatcher. Exactly two VMs boot (~4 min each under
software emulation).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from goldsmith import lineage
from goldsmith.airflow_env import AIRFLOW
from goldsmith.dag_factory import BUILD_VM_POOL
from goldsmith.local import catalog
from goldsmith.local.gallery import LocalGallery
from live_airflow import AirflowApi, live_airflow, wait_until

pytestmark = [pytest.mark.vm, pytest.mark.airflow]

GOLDSMITH = str(Path(AIRFLOW).with_name("goldsmith"))
GALLERY = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/live/providers/Microsoft.Compute"
BASE_DEF = f"{GALLERY}/galleries/live_gallery/images/live-base"
DERIVED_DEF = f"{GALLERY}/galleries/live_gallery/images/live-derived"
BUILD_TIMEOUT = 20 * 60  # one build is ~4 min alone; other VM tests may share the 2 cores


def write_template(folder: Path, name: str, properties: dict, **options: Any) -> None:
    body = {"location": "westeurope", "properties": {"vmProfile": {"vmSize": "Standard_D2s_v3"}, **properties},
            "goldsmith": {"retries": 0, **options}}
    (folder / f"{name}.json").write_text(json.dumps(body, indent=2))


@dataclass
class Live:
    api: AirflowApi
    env: dict[str, str]

    @property
    def home(self) -> Path:
        return Path(self.env["GOLDSMITH_HOME"])

    def goldsmith(self, *args: str) -> Any:
        result = subprocess.run([GOLDSMITH, *args, "--json"], env=self.env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, base_image: Path, request: pytest.FixtureRequest) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("live")
    templates = root / "templates"
    templates.mkdir()
    write_template(templates, "live-base", {
        "source": {"type": "PlatformImage", "publisher": "Debian", "offer": "debian-12", "sku": "12",
                   "version": "latest"},
        "customize": [{"type": "Shell", "name": "mark", "inline": ["echo base | sudo tee /etc/live-base"]}],
        "distribute": [{"type": "SharedImage", "runOutputName": "sig", "galleryImageId": BASE_DEF}],
    })
    write_template(templates, "live-derived", {
        "source": {"type": "SharedImageVersion", "imageVersionId": f"{BASE_DEF}/versions/latest"},
        # Fails unless the VM booted from the base's output.
        "customize": [{"type": "Shell", "name": "mark", "inline": [
            "test -f /etc/live-base", "echo derived | sudo tee /etc/live-derived"]}],
        "distribute": [{"type": "SharedImage", "runOutputName": "sig", "galleryImageId": DERIVED_DEF},
                       {"type": "VHD", "runOutputName": "vhd"}],
    }, sourceTrigger=True, sourcePollSeconds=10)

    with live_airflow(root, templates, request) as (api, env):
        yield Live(api, env)


def asset_events(api: AirflowApi, **filters: Any) -> list[dict[str, Any]]:
    return api.get("/assets/events", order_by="timestamp", **filters)["asset_events"]


def test_base_version_rebuilds_derived_image_and_watcher_notices_outside_versions(live: Live) -> None:
    api = live.api
    for dag_id in ("live-base", "live-derived"):
        api.wait_for_dag(dag_id)
        api.patch(f"/dags/{dag_id}", {"is_paused": False})

    # A forced base build, triggered over the REST API with conf.
    base_run = api.post("/dags/live-base/dagRuns", {"logical_date": None, "conf": {"forceRebuild": True}})["dag_run_id"]
    api.wait_for_run("live-base", base_run, BUILD_TIMEOUT)
    base_output = api.xcom("live-base", base_run, "distribute.sig")
    base_id = base_output["artifactId"]
    base_version = lineage.image_version(base_id)
    assert base_id.lower() == f"{BASE_DEF}/versions/{base_version}".lower()

    [base_event] = asset_events(api, source_dag_id="live-base", source_run_id=base_run)
    assert (base_event["uri"], base_event["source_task_id"]) == (lineage.image_uri(BASE_DEF), "distribute.sig")
    extra = base_event["extra"]
    debian = catalog.resolve("Debian", "debian-12", "12", "latest")
    assert (extra["version"], extra["artifactId"], extra["dagRunId"]) == (base_version, base_id, base_run)
    assert (extra["source"]["id"], extra["source"]["exactVersion"]) == (debian.urn, debian.exact_version)
    assert extra["templateDigest"].startswith("sha256:")

    # The event starts the derived build: an asset-triggered run that consumed exactly that event.
    runs = wait_until(lambda: api.runs("live-derived"), 120, "a live-derived run after the base's event")
    assert [r["run_type"] for r in runs] == ["asset_triggered"]
    derived_run = runs[0]["dag_run_id"]
    upstream = api.get(f"/dags/live-derived/dagRuns/{derived_run}/upstreamAssetEvents")["asset_events"]
    assert [e["id"] for e in upstream] == [base_event["id"]]
    api.wait_for_run("live-derived", derived_run, BUILD_TIMEOUT)
    derived_sig = api.xcom("live-derived", derived_run, "distribute.sig")
    derived_vhd = api.xcom("live-derived", derived_run, "distribute.vhd")
    assert Path(derived_vhd["artifactUri"].removeprefix("file://")).is_file()
    derived_events = asset_events(api, source_dag_id="live-derived", source_run_id=derived_run)
    assert sorted(e["source_task_id"] for e in derived_events) == ["distribute.sig", "distribute.vhd"]
    assert {e["extra"]["source"]["exactVersion"] for e in derived_events} == {base_version}

    # Lineage, from the artifacts' provenance: the derived image's parent is the base version, built from Debian.
    found = live.goldsmith("lineage", "live-derived")
    assert found["artifact"]["template"] == "live-derived"
    assert {found["artifact"]["id"], *(s["id"] for s in found["siblings"])} == {
        derived_sig["artifactId"], derived_vhd["artifactUri"]}
    assert [a["id"] for a in found["ancestors"]] == [base_id, debian.urn]
    assert {d["id"] for d in live.goldsmith("lineage", f"live-base@{base_version}")["descendants"]} == {
        derived_sig["artifactId"], derived_vhd["artifactUri"]}
    assert live.goldsmith("outdated") == []
    assert len(api.runs("live-derived")) == 1  # the watcher ignores versions a Goldsmith build published

    # The base again, unforced: nothing changed, so the run succeeds with every task skipped and says why.
    skip_run = api.post("/dags/live-base/dagRuns", {"logical_date": None, "conf": {}})["dag_run_id"]
    api.wait_for_run("live-base", skip_run, 5 * 60)
    tis = {ti["task_id"]: ti for ti in api.task_instances("live-base", skip_run)}
    assert {ti["state"] for ti in tis.values()} == {"skipped"}
    plan_log = api.task_log("live-base", skip_run, "plan", tis["plan"]["try_number"])
    assert f"nothing changed since the successful build {base_run}" in plan_log, plan_log[-3000:]
    assert asset_events(api, source_dag_id="live-base", source_run_id=skip_run) == []

    # A base version published outside Goldsmith. The watcher only runs while a DAG scheduled on the asset is
    # unpaused (Airflow drops paused DAGs' watchers), so live-derived stays unpaused and a closed VM pool keeps
    # the rebuild it starts from booting a third VM.
    api.patch(f"/pools/{BUILD_VM_POOL}", {"pool": BUILD_VM_POOL, "slots": 0, "include_deferred": False},
              update_mask="slots")
    gallery = LocalGallery(live.home / "gallery")
    built = gallery.resolve_image_version(base_id)
    disk = live.home / "vendor-disk.qcow2"
    shutil.copyfile(built.path, disk)
    vendor = gallery.publish_version(BASE_DEF, disk, run_key="vendor-drop", provenance={
        "source": built.metadata["provenance"]["source"], "parents": [], "template": "vendor-import",
        "templateDigest": "", "dagId": None, "runId": "vendor-drop"})
    [stale] = live.goldsmith("outdated")
    assert (stale["template"], stale["builtFrom"], stale["newest"]) == ("live-derived", base_version, vendor.version)

    def watcher_events() -> list[dict[str, Any]]:
        return [e for e in asset_events(api, asset_id=base_event["asset_id"]) if e["extra"].get("from_trigger")]

    [watcher_event] = wait_until(watcher_events, 90, "the AssetWatcher's event for the new base version")
    assert watcher_event["source_dag_id"] is None
    assert watcher_event["extra"]["payload"]["exactVersion"] == vendor.version
    [rebuild] = wait_until(lambda: api.runs("live-derived")[1:], 60, "a live-derived run after the watcher's event")
    assert rebuild["run_type"] == "asset_triggered"
    rebuild_run = rebuild["dag_run_id"]
    upstream = api.get(f"/dags/live-derived/dagRuns/{rebuild_run}/upstreamAssetEvents")["asset_events"]
    assert [e["id"] for e in upstream] == [watcher_event["id"]]

    def provision_state() -> str | None:
        return api.get(f"/dags/live-derived/dagRuns/{rebuild_run}/taskInstances/provision")["state"]

    # The rebuild plans from the new version, then waits at provision for a VM slot that never opens.
    wait_until(lambda: provision_state() == "scheduled", 180, "the rebuild waiting for a build VM slot")
    assert api.xcom("live-derived", rebuild_run, "plan", key="source")["exactVersion"] == vendor.version
    api.patch(f"/dags/live-derived/dagRuns/{rebuild_run}", {"state": "failed"})
    assert provision_state() == "skipped"  # it never ran: no third VM

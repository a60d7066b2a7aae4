"""The janitor deletes what azure builds left behind once their run has ended and their expiry has passed, and
nothing else; it is registered as a DAG when a template uses the azure backend."""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from test_backend import drive, env  # noqa: F401 - env is a fixture

from goldsmith.azure import arm
from goldsmith.azure.backend import AzureBackend
from goldsmith.azure.hooks import AzureBuildHook
from goldsmith.azure.janitor import JANITOR_DAG_ID, sweep
from goldsmith.core import Build
from goldsmith.dag_factory import build_dags
from goldsmith.template.loader import load_template
from goldsmith.template.plan import make_plan

LOCATION = "westus2"
LATER = datetime.now(timezone.utc) + timedelta(days=2)  # past every expiry a build sets


def write(folder: Path, name: str, properties: dict, backend: str = "azure") -> Path:
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"location": LOCATION, "properties": properties, "goldsmith": {"backend": backend}}))
    return path


def staged(tmp_path: Path, name: str, run_id: str, *, provision: bool = False, **properties) -> AzureBackend:
    path = write(tmp_path, name, {"source": {"type": "PlatformImage", "publisher": "Debian", "offer": "debian-12",
                                             "sku": "12", "version": "latest"},
                                  "distribute": [{"type": "VHD", "runOutputName": "vhd", "uri": "https://x.invalid/c"}],
                                  **properties})
    backend = AzureBackend(Build(make_plan(load_template(path)), name, run_id, {}, logging.getLogger("test")))
    drive(backend.prepare_staging)
    if provision:
        drive(lambda: backend.provision(backend.resolve_source()))
    return backend


def wait_gone(clients, resource_id: str) -> None:
    rid = arm.ResourceId.parse(resource_id)
    deadline = time.monotonic() + 30
    while arm.get(clients, rid) is not None:  # each GET is a poll: the double completes the deletion
        assert time.monotonic() < deadline, f"{resource_id} still exists"
        time.sleep(0.05)


def test_sweep_deletes_expired_groups_of_ended_runs_only(env, arm_double, tmp_path):
    ended = staged(tmp_path, "ended", "manual__ended")
    gone = staged(tmp_path, "gone", "manual__gone")
    running = staged(tmp_path, "running", "manual__running")
    fresh = staged(tmp_path, "fresh", "manual__fresh")
    unrelated = f"/subscriptions/{arm_double.subscription_id}/resourceGroups/not-goldsmith"
    arm_double.seed(unrelated, {"location": LOCATION, "tags": {"team": "x"}})
    states = {"ended": "success", "gone": None, "running": "running", "fresh": "failed"}
    clients = AzureBuildHook().clients()

    started = sweep(clients, lambda dag_id, run_id: states[dag_id], now=LATER)
    assert sorted(started) == sorted([str(ended.group), str(gone.group), str(fresh.group)])
    started = sweep(clients, lambda dag_id, run_id: states[dag_id], now=datetime.now(timezone.utc))
    assert started == []  # nothing has expired yet (and deletions in progress are not started again)
    for backend in (ended, gone, fresh):
        wait_gone(clients, str(backend.group))
    assert arm.get(clients, running.group) is not None
    states["running"] = "failed"
    assert sweep(clients, lambda dag_id, run_id: states[dag_id], now=LATER) == [str(running.group)]
    wait_gone(clients, str(running.group))


def test_sweep_removes_only_the_runs_resources_from_a_named_staging_group(env, arm_double, tmp_path):
    group = f"/subscriptions/{arm_double.subscription_id}/resourceGroups/team-staging"
    arm_double.seed(group, {"location": LOCATION, "tags": {"owner": "team"}})
    backend = staged(tmp_path, "named", "manual__1", provision=True, stagingResourceGroup=group)
    clients = AzureBuildHook().clients()
    vm = f"{group}/providers/Microsoft.Compute/virtualMachines/goldsmith-vm"
    assert sweep(clients, lambda dag_id, run_id: "failed", now=LATER) == [vm]  # the VM first
    wait_gone(clients, vm)
    rounds = 0
    while sweep(clients, lambda dag_id, run_id: "failed", now=LATER):  # then NIC and disk, then the network
        rounds += 1
        for resource_id in arm_double.resources():
            if resource_id.startswith(group + "/") and resource_id.count("/") == 8:  # not subnets, rules
                arm.get(clients, arm.ResourceId.parse(resource_id))  # polls the deletions to their end
    assert rounds == 2
    assert [r for r in arm_double.resources() if r.startswith(group)] == [group]
    tags = arm_double.get(group)["tags"]
    assert tags["owner"] == "team" and not [k for k in tags if k.startswith("goldsmith.")]
    assert backend.cleanup(keep_vm=False)["removed"] is True  # nothing of the run is left to clean


def test_janitor_dag_comes_with_azure_templates(tmp_path):
    local, azure = tmp_path / "local", tmp_path / "azure"
    local.mkdir()
    azure.mkdir()
    source = {"type": "PlatformImage", "publisher": "Debian", "offer": "debian-12", "sku": "12"}
    write(local, "only-local", {"source": source, "distribute": [{"type": "VHD", "runOutputName": "v"}]}, "local")
    write(azure, "on-azure", {"source": source, "distribute": [{"type": "VHD", "runOutputName": "v"}]})
    assert JANITOR_DAG_ID not in build_dags(local)
    dags = build_dags(azure)
    assert JANITOR_DAG_ID in dags and dags[JANITOR_DAG_ID].schedule == "@hourly"
    assert [t.task_id for t in dags[JANITOR_DAG_ID].tasks] == ["sweep"]

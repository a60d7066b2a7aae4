"""The compose deployment as a team runs it: UI and REST API, Flower, two build workers, builds triggered over
the REST API with the official client, each build kept on the worker that holds its VM."""

from __future__ import annotations

import json
import time
from typing import Any

import airflow_client.client as ac
import httpx
import pytest

Deployment = Any  # the session fixture of conftest.py


pytestmark = [pytest.mark.compose, pytest.mark.pending, pytest.mark.vm, pytest.mark.timeout(3600)]
BUILD_TIMEOUT = 1500  # seconds: a Debian build under emulation on a loaded 2-core host
VM_TASKS = ("prepare_staging", "provision", "customize", "validate", "generalize", "capture", "distribute",
            "cleanup_staging")


def test_the_ui_lists_only_goldsmith_dags_and_flower_answers(deployment: Deployment) -> None:
    dags = ac.DAGApi(deployment.client).get_dags()
    assert sorted(d.dag_id for d in dags.dags) == ["debian12-base", "debian12-golden"]  # no example DAGs
    assert all(not d.is_paused for d in dags.dags)
    pools = {p.name: p.slots for p in ac.PoolApi(deployment.client).get_pools().pools}
    assert pools["goldsmith_build_vms.build1"] == 1 and pools["goldsmith_build_vms.build2"] == 1
    flower = httpx.get(f"{deployment.flower_url}/workers?json=1", timeout=30)
    assert flower.status_code == 200
    assert {"celery@build1", "celery@build2"} <= set(flower.json())  # both workers registered with Flower


def test_builds_stay_on_the_worker_that_holds_their_vm(deployment: Deployment) -> None:
    runs = ac.DagRunApi(deployment.client)
    base = runs.trigger_dag_run("debian12-base", ac.TriggerDAGRunPostBody(conf={}))
    state = wait_for_run(deployment, "debian12-base", base.dag_run_id)
    assert state == "success", failed_logs(deployment, "debian12-base", base.dag_run_id)
    assert_on_host(deployment, "debian12-base", base.dag_run_id, "build1")

    # The base's new gallery version is an asset event: it starts the golden build, pinned to the other host.
    golden = wait_until(lambda: next(iter(runs.get_dag_runs("debian12-golden").dag_runs), None), 300,
                        "a debian12-golden run started by the base's asset event")
    assert golden.run_type == "asset_triggered"
    state = wait_for_run(deployment, "debian12-golden", golden.dag_run_id)
    assert state == "success", failed_logs(deployment, "debian12-golden", golden.dag_run_id)
    assert_on_host(deployment, "debian12-golden", golden.dag_run_id, "build2")

    gallery = json.loads(deployment.on_worker("build1", "goldsmith gallery list --json"))
    names = json.dumps(gallery)
    assert "debian12-base" in names and "debian12-golden" in names  # one gallery, shared by both hosts
    for host in ("build1", "build2"):  # no VM, overlay or staging area left on either host
        assert deployment.on_worker(host, "ls -A /opt/goldsmith-home/staging; pgrep -a qemu || true").strip() == ""


def assert_on_host(deployment: Deployment, dag_id: str, run_id: str, host: str) -> None:
    tis = ac.TaskInstanceApi(deployment.client).get_task_instances(dag_id, run_id).task_instances
    for ti in tis:
        assert ti.queue == f"goldsmith.{host}", (ti.task_id, ti.queue)
        if ti.task_id.split(".")[0] in VM_TASKS:
            assert ti.hostname == host, (ti.task_id, ti.hostname)
            assert ti.pool in (f"goldsmith_build_vms.{host}", "default_pool"), (ti.task_id, ti.pool)
    provision = next(ti for ti in tis if ti.task_id == "provision")
    assert provision.pool == f"goldsmith_build_vms.{host}"
    staged = ac.XComApi(deployment.client).get_xcom_entry(dag_id, "prepare_staging", run_id, "return_value")
    assert staged.value["host"] == host


def wait_for_run(deployment: Deployment, dag_id: str, run_id: str) -> str:
    runs = ac.DagRunApi(deployment.client)
    return wait_until(lambda: (s := runs.get_dag_run(dag_id, run_id).state.value) in ("success", "failed") and s,
                      BUILD_TIMEOUT, f"{dag_id} run {run_id} to finish")


def failed_logs(deployment: Deployment, dag_id: str, run_id: str) -> str:
    tis = ac.TaskInstanceApi(deployment.client).get_task_instances(dag_id, run_id).task_instances
    return "\n".join(f"{ti.task_id}: {ti.state} on {ti.hostname}" for ti in tis)


def wait_until(check, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(5)
    raise AssertionError(f"timed out waiting for {what}")

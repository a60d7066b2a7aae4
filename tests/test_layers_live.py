"""Step layers on a real Airflow, driven through the REST API: a build that fails at its last customizer is
cleared ("clear failed" with its downstream) and resumes from the layer of the step before, after cleanup_staging
removed its VM; the next run, its last step edited, starts from the first step's layer and shows that step
skipped with the reason. Three boots.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from goldsmith.local import layers
from goldsmith.local.gallery import LocalGallery
from live_airflow import TERMINAL_RUN_STATES, AirflowApi, live_airflow
from test_build_e2e import read_file_from_image

pytestmark = [pytest.mark.vm, pytest.mark.airflow, pytest.mark.pending]
GALLERY = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/live/providers/Microsoft.Compute"
IMAGE = f"{GALLERY}/images/layered-live"
BUILD_TIMEOUT = 30 * 60  # a boot is 1.5-5 min under emulation, with other VMs on the 2 cores


def write_template(path: Path, port: int, last: str) -> None:
    # Retries only for a task the loaded host failed to start: a failing customizer fails at once (BuildError).
    options = {"retries": 2, "retryDelaySeconds": 5}
    path.write_text(json.dumps({"location": "westeurope", "goldsmith": options, "properties": {
        "vmProfile": {"vmSize": "Standard_D2s_v3"},
        "source": {"type": "PlatformImage", "publisher": "Debian", "offer": "debian-12", "sku": "12",
                   "version": "latest"},
        "customize": [
            {"type": "Shell", "name": "one", "inline": ["echo one | sudo tee -a /etc/marks"]},
            # Needs a host port that is closed in the first run, as a flaky mirror would fail a build.
            {"type": "Shell", "name": "two", "inline": [
                f"bash -c 'exec 3<>/dev/tcp/10.0.2.2/{port}'", f"echo {last} | sudo tee -a /etc/marks"]}],
        "distribute": [{"type": "ManagedImage", "runOutputName": "img", "location": "westeurope", "imageId": IMAGE}],
    }}))


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, base_image: Path,
         request: pytest.FixtureRequest) -> Iterator[tuple[AirflowApi, dict[str, str], int]]:
    root = tmp_path_factory.mktemp("layers-live")
    (root / "templates").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    write_template(root / "templates" / "layered-live.json", port, "two")
    with live_airflow(root, root / "templates", request, GOLDSMITH_LAYERS=str(root / "layers")) as (api, env):
        yield api, env, port


def finished(api: AirflowApi, run_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + BUILD_TIMEOUT
    while (run := api.get(f"/dags/layered-live/dagRuns/{run_id}"))["state"] not in TERMINAL_RUN_STATES:
        assert time.monotonic() < deadline, api.task_states("layered-live", run_id)
        time.sleep(5)
    return run


def task_instances(api: AirflowApi, run_id: str) -> dict[str, dict[str, Any]]:
    return {ti["task_id"]: ti for ti in api.task_instances("layered-live", run_id)}


def test_a_failed_build_cleared_over_rest_resumes_from_its_layer_and_the_next_run_reuses_it(live, tmp_path) -> None:
    api, env, port = live
    home = Path(env["GOLDSMITH_HOME"])
    api.wait_for_dag("layered-live")
    api.patch("/dags/layered-live", {"is_paused": False})
    run_id = api.post("/dags/layered-live/dagRuns", {"logical_date": None, "conf": {}})["dag_run_id"]
    assert finished(api, run_id)["state"] == "failed"
    tis = task_instances(api, run_id)
    assert (tis["customize.0_one"]["state"], tis["customize.1_two"]["state"]) == ("success", "failed")
    assert tis["cleanup_staging"]["state"] == "success" and not any((home / "staging").iterdir())
    cache = layers.LayerCache(Path(env["GOLDSMITH_LAYERS"]))
    assert [(e["task"], e["run"]) for e in cache.entries()] == [("customize.0_one", f"layered-live/{run_id}")]
    first_layer = cache.entries()[0]["key"]

    with socket.create_server(("127.0.0.1", port)):  # the mirror is back
        # As the UI's "Clear" of the failed task: with its downstream, so Airflow also runs the staging area's
        # setup and teardown (prepare_staging, cleanup_staging) again.
        api.post("/dags/layered-live/clearTaskInstances", {
            "dry_run": False, "dag_run_id": run_id, "task_ids": ["customize.1_two"], "only_failed": False,
            "include_downstream": True, "reset_dag_runs": True})
        api.wait_for_run("layered-live", run_id, BUILD_TIMEOUT)
        tis = task_instances(api, run_id)
        assert tis["customize.0_one"]["try_number"] == 1 and tis["provision"]["try_number"] == 1  # not run again
        assert tis["cleanup_staging"]["try_number"] == 2 and not any((home / "staging").iterdir())
        log = api.task_log("layered-live", run_id, "customize.1_two", tis["customize.1_two"]["try_number"])
        assert "resuming from the cached layer of customize.0_one" in log, log[-3000:]
        image = LocalGallery(home / "gallery").resolve_managed_image(IMAGE)
        assert read_file_from_image(image.path, "/etc/marks", tmp_path) == "one\ntwo\n"  # each step's mark once

        # The last step edited: the next run starts from the first step's layer, which Airflow shows skipped.
        write_template(Path(env["GOLDSMITH_TEMPLATES"]) / "layered-live.json", port, "two-edited")
        second = api.post("/dags/layered-live/dagRuns", {"logical_date": None, "conf": {}})["dag_run_id"]
        api.wait_for_run("layered-live", second, BUILD_TIMEOUT)
    tis = task_instances(api, second)
    assert (tis["customize.0_one"]["state"], tis["customize.1_two"]["state"]) == ("skipped", "success")
    log = api.task_log("layered-live", second, "customize.0_one", tis["customize.0_one"]["try_number"])
    assert f"already in the cached layer {first_layer[:16]}" in log, log[-3000:]
    assert f"made by run layered-live/{run_id}" in log
    image = LocalGallery(home / "gallery").resolve_managed_image(IMAGE)
    assert read_file_from_image(image.path, "/etc/marks", tmp_path) == "one\ntwo-edited\n"
    assert [r["task"] for r in image.metadata["provenance"]["layers"]] == ["customize.0_one"]
    assert not any((home / "staging").iterdir())

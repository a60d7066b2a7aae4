"""Whole azure builds through real Airflow (`airflow dags test`): the DAG factory, the operators deferring to
the trigger (run inline by dags test), XCom, the teardown, run outputs, against the ARM double."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.mgmt.resource.resources import ResourceManagementClient

from goldsmith.airflow_env import AIRFLOW, airflow_environ, prepare

pytestmark = pytest.mark.airflow

LOCATION = "westus2"
GOLDSMITH = str(Path(AIRFLOW).with_name("goldsmith"))


@pytest.fixture(params=[True, False], ids=["deferrable", "worker-waits"])
def airflow_env(azure_connection, arm_double, tmp_path, request) -> dict[str, str]:
    conn = json.loads(azure_connection.json)
    conn["extra"].update(goldsmith_ssh_source="127.0.0.0/8", goldsmith_poll_interval="0.05")
    group = f"/subscriptions/{arm_double.subscription_id}/resourceGroups/images"
    arm_double.seed(group, {"location": LOCATION})
    arm_double.seed(f"{group}/providers/Microsoft.Compute/galleries/golden", {"location": LOCATION})
    arm_double.seed(f"{group}/providers/Microsoft.Compute/galleries/golden/images/linux", {
        "location": LOCATION, "properties": {"osType": "Linux", "osState": "Generalized", "hyperVGeneration": "V1",
                                             "identifier": {"publisher": "goldsmith", "offer": "linux", "sku": "1"}}})
    templates = tmp_path / "templates"
    templates.mkdir()
    env = airflow_environ(tmp_path / "airflow", templates, tmp_path / "home")
    env.update({"AIRFLOW_CONN_AZURE_DEFAULT": json.dumps(conn), "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": str(request.param),
                "GROUP": group})
    prepare(env)
    return env


def write_template(env: dict[str, str], name: str, properties: dict, **options) -> None:
    body = {"location": LOCATION, "properties": properties, "goldsmith": {"backend": "azure", "retries": 1,
                                                                         "retryDelaySeconds": 1, **options}}
    (Path(env["GOLDSMITH_TEMPLATES"]) / f"{name}.json").write_text(json.dumps(body, indent=2))


def dags_test(env: dict[str, str], dag_id: str) -> subprocess.CompletedProcess:
    return subprocess.run([AIRFLOW, "dags", "test", dag_id], env=env, capture_output=True, text=True, timeout=900)


def test_linux_build_through_airflow(airflow_env, arm_double):
    env, group = airflow_env, airflow_env["GROUP"]
    definition = f"{group}/providers/Microsoft.Compute/galleries/golden/images/linux"
    write_template(env, "az-linux", {
        "source": {"type": "PlatformImage", "publisher": "Debian", "offer": "debian-12", "sku": "12",
                   "version": "latest"},
        "customize": [{"type": "Shell", "name": "hello", "inline": ["echo streamed-from-the-azure-vm",
                                                                    "sudo touch /etc/goldsmith"]}],
        "validate": {"inVMValidations": [{"type": "Shell", "name": "check", "inline": ["test -f /etc/goldsmith"]}]},
        "distribute": [{"type": "SharedImage", "runOutputName": "sig", "galleryImageId": definition,
                        "targetRegions": [{"name": LOCATION}, {"name": "eastus"}]}],
    })
    result = dags_test(env, "az-linux")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-8000:]
    assert "streamed-from-the-azure-vm" in log
    deferred = "[DAG TEST] running trigger in line" in log  # dags test runs a deferred task's trigger itself
    assert deferred == (env["AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE"] == "True")
    outputs = json.loads(subprocess.run([GOLDSMITH, "run-outputs", "az-linux", "--json"], env=env, check=True,
                                        capture_output=True, text=True).stdout)["value"]
    (sig,) = outputs
    assert sig["properties"]["artifactId"] == f"{definition}/versions/0.0.1"
    arm_double.keep(sig["properties"]["artifactId"])


def test_windows_templates_load_for_the_azure_backend(tmp_path):
    from goldsmith.dag_factory import build_dags

    body = {"location": LOCATION, "goldsmith": {"backend": "azure"}, "properties": {
        "source": {"type": "PlatformImage", "publisher": "MicrosoftWindowsServer", "offer": "WindowsServer",
                   "sku": "2022-datacenter-azure-edition", "version": "latest"},
        "customize": [{"type": "PowerShell", "inline": ["Write-Output hi"]}, {"type": "WindowsRestart"},
                      {"type": "WindowsUpdate", "updateLimit": 10}],
        "validate": {"inVMValidations": [{"type": "PowerShell", "inline": ["exit 0"]}]},
        "distribute": [{"type": "VHD", "runOutputName": "vhd"}]}}
    (tmp_path / "win.json").write_text(json.dumps(body))
    dag = build_dags(tmp_path)["win"]
    assert "invalid-template" not in dag.tags
    assert [t for t in dag.task_ids if t.startswith(("customize.", "validate."))] == [
        "customize.0_powershell", "customize.1_windowsrestart", "customize.2_windowsupdate", "validate.0_powershell"]


def test_the_janitor_dag_deletes_a_leaked_staging_group(airflow_env, arm_double, azure_credentials):
    env = airflow_env
    write_template(env, "az-any", {"source": {"type": "PlatformImage", "publisher": "Debian", "offer": "debian-12",
                                              "sku": "12"}, "distribute": [{"type": "VHD", "runOutputName": "v"}]})
    leaked = f"/subscriptions/{arm_double.subscription_id}/resourceGroups/IT_images_az-any_leaked"
    arm_double.seed(leaked, {"location": LOCATION, "tags": {
        "createdBy": "goldsmith", "goldsmith.dagId": "az-any", "goldsmith.runId": "manual__never-ran",
        "goldsmith.expiry": "2020-01-01T00:00:00+00:00"}})
    result = dags_test(env, "goldsmith_azure_janitor")
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert arm_double.get(leaked)["properties"]["provisioningState"] == "Deleting"
    # The delete the janitor started completes: the group is gone, as a client reading it again sees.
    c = azure_credentials
    groups = ResourceManagementClient(c.credential(), c.subscription_id, **c.client_kwargs()).resource_groups
    with pytest.raises(ResourceNotFoundError):
        groups.get(leaked.rsplit("/", 1)[1])
    assert leaked not in arm_double.resources()

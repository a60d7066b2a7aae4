"""Opt-in smoke test against a real Azure subscription, so a maintainer can confirm the ARM double's picture
against Azure itself: a tiny Linux image built through the DAG (`airflow dags test`), distributed to a new
gallery image version, and everything deleted after (the staging group by the build's cleanup, the version
by this test). Costs a few cents and ~15 minutes.

    GOLDSMITH_SMOKE_AZURE_CONN='{"conn_type": "azure", "login": "<client id>", "password": "<secret>",
                                 "extra": {"tenantId": "...", "subscriptionId": "..."}}'
    GOLDSMITH_SMOKE_AZURE_IMAGE=/subscriptions/.../galleries/<g>/images/<a Gen2 Linux definition>
    GOLDSMITH_SMOKE_AZURE_LOCATION=westeurope   # optional, default westeurope
    .venv/bin/pytest -q tests/azure/test_real_azure.py

The service principal needs Contributor on the subscription (it creates and deletes the staging group) and
the worker must reach the VM's public IP on port 22 (goldsmith_ssh_source: auto asks api.ipify.org).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from goldsmith.airflow_env import AIRFLOW, airflow_environ, prepare

CONN = os.environ.get("GOLDSMITH_SMOKE_AZURE_CONN")
IMAGE = os.environ.get("GOLDSMITH_SMOKE_AZURE_IMAGE")
LOCATION = os.environ.get("GOLDSMITH_SMOKE_AZURE_LOCATION", "westeurope")
GOLDSMITH = str(Path(AIRFLOW).with_name("goldsmith"))

pytestmark = [pytest.mark.airflow, pytest.mark.skipif(
    not (CONN and IMAGE), reason="the real-Azure smoke test is opt-in: set GOLDSMITH_SMOKE_AZURE_CONN and "
    "GOLDSMITH_SMOKE_AZURE_IMAGE (see tests/azure/test_real_azure.py)")]


def test_a_tiny_linux_image_through_the_dag_to_a_gallery_version(tmp_path):
    from azure.identity import ClientSecretCredential
    from azure.mgmt.compute import ComputeManagementClient
    from azure.mgmt.resource.resources import ResourceManagementClient

    conn = json.loads(CONN)
    extra = conn.get("extra") or {}
    templates = tmp_path / "templates"
    templates.mkdir()
    env = airflow_environ(tmp_path / "airflow", templates, tmp_path / "home")
    env["AIRFLOW_CONN_AZURE_DEFAULT"] = CONN
    prepare(env)
    (templates / "smoke.json").write_text(json.dumps({"location": LOCATION, "goldsmith": {"backend": "azure"},
                                                      "properties": {
        "source": {"type": "PlatformImage", "publisher": "Debian", "offer": "debian-12", "sku": "12-gen2",
                   "version": "latest"},
        "vmProfile": {"vmSize": "Standard_D2ds_v4"},
        "customize": [{"type": "Shell", "name": "mark", "inline": ["echo smoke | sudo tee /etc/goldsmith-smoke"]}],
        "validate": {"inVMValidations": [{"type": "Shell", "name": "check", "inline": ["test -f /etc/goldsmith-smoke"]}]},
        "distribute": [{"type": "SharedImage", "runOutputName": "sig", "galleryImageId": IMAGE,
                        "targetRegions": [{"name": LOCATION}]}]}}))

    credential = ClientSecretCredential(extra["tenantId"], conn["login"], conn["password"])
    subscription = extra["subscriptionId"]
    compute = ComputeManagementClient(credential, subscription)
    groups = ResourceManagementClient(credential, subscription).resource_groups
    version_id = None
    try:
        result = subprocess.run([AIRFLOW, "dags", "test", "smoke"], env=env, capture_output=True, text=True,
                                timeout=3600)
        assert result.returncode == 0, (result.stdout + result.stderr)[-8000:]
        outputs = json.loads(subprocess.run([GOLDSMITH, "run-outputs", "smoke", "--json"], env=env, check=True,
                                            capture_output=True, text=True).stdout)["value"]
        version_id = outputs[0]["properties"]["artifactId"]
        assert "/versions/" in version_id
        assert not [g.name for g in groups.list(filter="tagName eq 'goldsmith.template' and tagValue eq 'smoke'")]
    finally:
        if version_id:  # everything the test made goes, the version included
            parts = version_id.split("/")
            compute.gallery_image_versions.begin_delete(parts[4], parts[8], parts[10], parts[12]).result()

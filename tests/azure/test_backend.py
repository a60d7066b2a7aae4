"""The azure backend against the ARM test double and Azurite: the real azure-identity and azure-mgmt-* clients
over HTTPS, Linux build VMs with a real sshd (customizers really run), Windows VMs whose Run Commands are
recorded. Most tests drive the backend's steps in this process, as the operators do (a step raising Pending is
called again once its trigger fires); one runs a whole build through `airflow dags test`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any, Callable

import pytest

from goldsmith.azure.backend import AzureBackend
from goldsmith.build import Build, BuildError, Pending
from goldsmith.operators.steps import _first_event
from goldsmith.template.loader import load_template
from goldsmith.template.plan import make_plan

LOCATION = "westus2"
DEBIAN = {"type": "PlatformImage", "publisher": "Debian", "offer": "debian-12", "sku": "12", "version": "latest"}
WINDOWS = {"type": "PlatformImage", "publisher": "MicrosoftWindowsServer", "offer": "WindowsServer",
           "sku": "2019-Datacenter", "version": "latest"}


@pytest.fixture
def env(azure_connection, monkeypatch, tmp_path) -> dict[str, Any]:
    """The connection of the conftest, plus goldsmith's extras: SSH from loopback, fast polling."""
    conn = json.loads(azure_connection.json)
    conn["extra"].update(goldsmith_ssh_source="127.0.0.0/8", goldsmith_poll_interval="0.05")
    monkeypatch.setenv("AIRFLOW_CONN_AZURE_DEFAULT", json.dumps(conn))
    monkeypatch.setenv("GOLDSMITH_HOME", str(tmp_path / "home"))
    return conn


def make_build(tmp_path: Path, properties: dict[str, Any], name: str = "tpl", run_id: str = "manual__1",
               params: dict[str, Any] | None = None) -> Build:
    body = {"location": LOCATION, "properties": properties, "goldsmith": {"backend": "azure"}}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(body))
    return Build(make_plan(load_template(path)), name, run_id, params or {}, logging.getLogger("test.build"))


def drive(call: Callable[[], Any], on_pending: Callable[[Pending], None] | None = None) -> Any:
    """What an operator does: call the step; when it raises Pending, run the trigger, then call it again."""
    while True:
        try:
            return call()
        except Pending as pending:
            if on_pending:
                on_pending(pending)
            event = asyncio.run(_first_event(pending.trigger))
            if event["status"] != "success":
                raise RuntimeError(event["message"])


def run_build(backend: AzureBackend) -> dict[str, Any]:
    source = backend.resolve_source()
    drive(backend.prepare_staging)
    drive(lambda: backend.provision(source))
    for step in backend.build.plan.customize_steps():
        drive(lambda: backend.customize(step))
    for step in backend.build.plan.validate_steps():
        drive(lambda: backend.validate(step))
    drive(backend.generalize)
    drive(backend.capture)
    outputs = {step.name: drive(lambda: backend.distribute(step, source)) for step in backend.build.plan.distribute_steps()}
    drive(lambda: backend.cleanup(keep_vm=False))
    return {"source": source, "outputs": outputs}


def test_linux_build_end_to_end(env, arm_double, tmp_path):
    group = f"/subscriptions/{arm_double.subscription_id}/resourceGroups/images"
    arm_double.seed(group, {"location": LOCATION})
    build = make_build(tmp_path, {
        "source": DEBIAN,
        "customize": [{"type": "Shell", "name": "marker", "inline": ["echo hello-from-the-vm",
                                                                     "echo built | sudo tee /etc/goldsmith-marker"]}],
        "distribute": [{"type": "ManagedImage", "runOutputName": "managed", "location": LOCATION,
                        "imageId": f"{group}/providers/Microsoft.Compute/images/golden"}],
    })
    result = run_build(AzureBackend(build))
    assert result["source"]["exactVersion"] == "0.20250305.2040"
    assert result["outputs"]["managed"]["artifactId"].endswith("/images/golden")
    arm_double.keep(f"{group}/providers/Microsoft.Compute/images/golden")

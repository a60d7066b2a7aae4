"""The azure backend against the ARM test double and Azurite: the real azure-identity and azure-mgmt-* clients
over HTTPS, Linux build VMs with a real sshd (customizers really run), Windows VMs whose Run Commands are
recorded. The tests drive the backend's steps in this process, as the operators do (a step raising Pending is
called again once its trigger has fired); test_backend_dags.py runs whole builds through `airflow dags test`.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
from azure.storage.blob import BlobServiceClient, ContainerSasPermissions, generate_container_sas

from goldsmith import runoutputs, sbom
from goldsmith.azure.backend import AzureBackend
from goldsmith.core import Build, BuildError, Pending, trigger_for
from goldsmith.operators.steps import _first_event
from goldsmith.template.loader import load_template
from goldsmith.template.plan import make_plan
from test_sbom import validate_cyclonedx

LOCATION = "westus2"
DEBIAN = {"type": "PlatformImage", "publisher": "Debian", "offer": "debian-12", "sku": "12", "version": "latest"}
WINDOWS = {"type": "PlatformImage", "publisher": "MicrosoftWindowsServer", "offer": "WindowsServer",
           "sku": "2019-Datacenter", "version": "latest"}


@pytest.fixture
def env(azure_connection, monkeypatch, tmp_path) -> dict[str, Any]:
    """The conftest's connection plus goldsmith's extras: SSH from loopback, fast polling."""
    conn = json.loads(azure_connection.json)
    conn["extra"].update(goldsmith_ssh_source="127.0.0.0/8", goldsmith_poll_interval="0.05")
    monkeypatch.setenv("AIRFLOW_CONN_AZURE_DEFAULT", json.dumps(conn))
    monkeypatch.setenv("GOLDSMITH_HOME", str(tmp_path / "home"))
    return conn


@pytest.fixture
def images(arm_double) -> str:
    """A resource group with a gallery and Linux and Windows image definitions, as a team would have."""
    group = f"/subscriptions/{arm_double.subscription_id}/resourceGroups/images"
    arm_double.seed(group, {"location": LOCATION})
    arm_double.seed(f"{group}/providers/Microsoft.Compute/galleries/golden", {"location": LOCATION})
    for name, os_type in (("linux", "Linux"), ("windows", "Windows")):
        arm_double.seed(f"{group}/providers/Microsoft.Compute/galleries/golden/images/{name}", {
            "location": LOCATION, "properties": {
                "osType": os_type, "osState": "Generalized", "hyperVGeneration": "V1",
                "identifier": {"publisher": "goldsmith", "offer": name, "sku": "1"}}})
    return group


def make_build(tmp_path: Path, properties: dict[str, Any], name: str = "tpl", run_id: str = "manual__1",
               params: dict[str, Any] | None = None, **top: Any) -> Build:
    body = {"location": LOCATION, "properties": properties, "goldsmith": {"backend": "azure"}, **top}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(body))
    return Build(make_plan(load_template(path)), name, run_id, params or {}, logging.getLogger("test.build"))


def drive(call: Callable[[], Any], pending: list[Pending] | None = None) -> Any:
    """What an operator does: call the step; when it raises Pending, run the trigger, then call it again."""
    while True:
        try:
            return call()
        except Pending as p:
            if pending is not None:
                pending.append(p)
            event = asyncio.run(_first_event(trigger_for(p.wait)))
            if event["status"] != "success":
                raise RuntimeError(event["message"])


def run_build(backend: AzureBackend) -> dict[str, Any]:
    """Every step in DAG order; cleanup always runs."""
    source = backend.resolve_source()
    plan = backend.build.plan
    try:
        drive(backend.prepare_staging)
        drive(lambda: backend.provision(source))
        for step in plan.customize_steps():
            drive(lambda: backend.customize(step))
        for step in plan.validate_steps():
            drive(lambda: backend.validate(step))
        drive(backend.generalize)
        drive(backend.capture)
        outputs = {step.name: drive(lambda: backend.distribute(step, source)) for step in plan.distribute_steps()}
    finally:
        drive(lambda: backend.cleanup(keep_vm=False))
    return {"source": source, "outputs": outputs}


def vhd_container(azurite) -> str:
    """A container URL with a SAS that lets the copy write into it."""
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    container = service.get_container_client("vhds")
    if not container.exists():
        container.create_container()
    sas = generate_container_sas(service.account_name, "vhds", account_key=service.credential.account_key,
                                 permission=ContainerSasPermissions(read=True, write=True, create=True),
                                 expiry=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1))
    return f"{container.url}?{sas}"


def puts(arm_double, fragment: str) -> int:
    return sum(1 for c in arm_double.calls if c.method == "PUT" and c.path.lower().endswith(fragment.lower()))


# --- a Linux build, end to end ---------------------------------------------------------------------------


def test_linux_build_customizes_over_ssh_and_distributes_everywhere(env, arm_double, azurite, images, tmp_path,
                                                                      caplog):
    payload = tmp_path / "payload.txt"
    payload.write_text("payload from the File customizer\n")
    definition = f"{images}/providers/Microsoft.Compute/galleries/golden/images/linux"
    build = make_build(tmp_path, {
        "source": DEBIAN,
        "customize": [
            {"type": "Shell", "name": "marker", "inline": ["echo hello-from-the-vm",
                                                           "echo built | sudo tee /etc/goldsmith-marker"]},
            {"type": "File", "name": "payload", "sourceUri": payload.as_uri(), "destination": "/tmp/payload.txt"},
        ],
        "validate": {"inVMValidations": [{"type": "Shell", "name": "check", "inline": [
            "grep -q built /etc/goldsmith-marker", "grep -q 'File customizer' /tmp/payload.txt"]}]},
        "distribute": [
            {"type": "ManagedImage", "runOutputName": "managed", "location": LOCATION,
             "imageId": f"{images}/providers/Microsoft.Compute/images/golden"},
            {"type": "SharedImage", "runOutputName": "sig", "galleryImageId": definition,
             "targetRegions": [{"name": LOCATION, "replicaCount": 2}, {"name": "eastus"}],
             "excludeFromLatest": True, "replicationMode": "Shallow", "artifactTags": {"stage": "base"}},
            {"type": "VHD", "runOutputName": "vhd", "uri": vhd_container(azurite)},
        ],
    })
    caplog.set_level(logging.INFO)
    result = run_build(AzureBackend(build))

    assert result["source"]["exactVersion"] == "0.20250305.2040"  # `latest` from the marketplace listing
    assert "hello-from-the-vm" in caplog.text  # customizer output reaches the task log
    outputs = result["outputs"]
    assert outputs["managed"]["artifactId"] == f"{images}/providers/Microsoft.Compute/images/golden"
    assert outputs["sig"]["artifactId"] == f"{definition}/versions/0.0.1"
    version = arm_double.get(outputs["sig"]["artifactId"])
    profile = version["properties"]["publishingProfile"]
    assert [(r["name"], r["regionalReplicaCount"]) for r in profile["targetRegions"]] == [(LOCATION, 2), ("eastus", 1)]
    assert profile["excludeFromLatest"] is True and profile["replicationMode"] == "Shallow"
    assert version["tags"]["stage"] == "base" and version["tags"]["goldsmith.sourceVersion"] == "0.20250305.2040"
    assert "replication" in caplog.text  # per-region progress was watched

    vhd = outputs["vhd"]["artifactUri"]
    assert vhd.endswith(".vhd") and "?" not in vhd
    blob = BlobServiceClient.from_connection_string(azurite.connection_string).get_container_client("vhds") \
        .get_blob_client(vhd.rsplit("/", 1)[1])
    assert blob.download_blob().readall()[-512:][:8] == b"conectix"  # the disk's bytes, a fixed VHD

    _, recorded = runoutputs.list_outputs("tpl", "manual__1")
    assert {o["name"]: o["properties"]["provisioningState"] for o in recorded} == dict.fromkeys(
        ("managed", "sig", "vhd"), "Succeeded")
    # The SBOM: the guest's dpkg database, kept in the run's record, its digest on every artifact.
    bom = outputs["sig"]["sbom"]
    assert bom == outputs["managed"]["sbom"] == outputs["vhd"]["sbom"] and bom["packages"] > 100
    doc = json.loads(runoutputs.document_path("tpl", "manual__1", sbom.FILE_NAME).read_text())
    validate_cyclonedx(doc)
    assert len(sbom.packages(doc)) == bom["packages"] and "openssh-server:amd64" in sbom.packages(doc)
    assert version["tags"]["goldsmith.sbom.sha256"] == bom["sha256"]
    beside = BlobServiceClient.from_connection_string(azurite.connection_string).get_container_client("vhds") \
        .get_blob_client(vhd.rsplit("/", 1)[1] + ".sbom.cdx.json")
    assert json.loads(beside.download_blob().readall()) == doc  # stored with the VHD
    vm_put = next(c for c in arm_double.calls if c.method == "PUT" and c.path.endswith("/virtualMachines/goldsmith-vm"))
    assert vm_put  # the VM was created once and deleted with the staging group (leftovers are checked after the test)
    arm_double.keep(f"{images}/providers/Microsoft.Compute/images/golden", outputs["sig"]["artifactId"])


# --- a Windows build: Run Command ------------------------------------------------------------------------


def test_windows_customizers_run_as_run_commands(env, arm_double, images, tmp_path, capsys):
    payload = tmp_path / "tool.cfg"
    payload.write_bytes(b"setting=1\n" * 50)
    scripts: list[str] = []

    def guest(vm: str, command_id: str, script: str, parameters: list) -> tuple[str, str]:
        scripts.append(script)
        if script == sbom.WINDOWS_SCRIPT:  # what the inventory script prints on Windows Server 2019
            return "goldsmith-sbom:" + json.dumps({
                "os": {"ID": "windows", "NAME": "Microsoft Windows Server 2019 Datacenter", "VERSION_ID": "10.0.17763"},
                "programs": [{"name": "Microsoft Edge", "version": "131.0.2903.70", "publisher": "Microsoft Corporation"}],
                "updates": [{"id": "KB5044277", "description": "Security Update"}]}) + "\n", ""
        if "LastBootUpTime" in script and "goldsmith-boot:" in script:
            return "goldsmith-boot:2025-01-01T00:00:00.0000000Z\n", ""
        if "Microsoft.Update.Session" in script:  # the first round wants a restart, the second finds nothing
            rounds = sum("Microsoft.Update.Session" in s for s in scripts)
            return ("installed 2 update(s)\ngoldsmith: reboot required\n" if rounds == 1 else
                    "no updates to install\n"), ""
        return f"ran {len(script)} bytes\n", ""

    arm_double.windows_run_command = guest
    build = make_build(tmp_path, {
        "source": WINDOWS,
        "customize": [
            {"type": "PowerShell", "name": "settings", "inline": ["Set-Content C:\\marker.txt 'built'"],
             "runElevated": True, "validExitCodes": [0, 3010]},
            {"type": "File", "name": "config", "sourceUri": payload.as_uri(), "destination": "C:\\tool.cfg"},
            {"type": "WindowsRestart", "restartCheckCommand": "echo back", "restartTimeout": "10m"},
            {"type": "WindowsUpdate", "searchCriteria": "IsInstalled=0", "updateLimit": 40,
             "filters": ["exclude:$_.Title -like '*Preview*'", "include:$true"]},
        ],
        "validate": {"inVMValidations": [
            {"type": "PowerShell", "name": "check", "inline": ["Test-Path C:\\marker.txt"]}]},
        "distribute": [{"type": "SharedImage", "runOutputName": "sig",
                        "galleryImageId": f"{images}/providers/Microsoft.Compute/galleries/golden/images/windows"}],
    })
    result = run_build(AzureBackend(build))

    joined = "\n".join(scripts)
    assert "Set-Content C:\\marker.txt 'built'" in scripts[0]
    assert "setting=1" not in joined and "[Convert]::FromBase64String" in scripts[1]  # the File's bytes, encoded
    assert "shutdown /r /f /t 0" in scripts[2] and "echo back" in scripts[3] and "AddSeconds(600)" in scripts[3]
    update = next(s for s in scripts if "Microsoft.Update.Session" in s)
    assert "Search('IsInstalled=0')" in update and "-ge 40" in update and "*Preview*" in update
    assert sum("Microsoft.Update.Session" in s for s in scripts) == 2  # again after the restart it asked for
    assert "Test-Path C:\\marker.txt" in scripts[-3] and "Sysprep.exe /oobe /generalize /quiet /quit" in scripts[-1]
    assert scripts[-2] == sbom.WINDOWS_SCRIPT  # the SBOM is taken before sysprep
    doc = json.loads(runoutputs.document_path("tpl", "manual__1", sbom.FILE_NAME).read_text())
    validate_cyclonedx(doc)
    assert sorted(sbom.packages(doc)) == ["KB5044277", "Microsoft Edge"]
    version = arm_double.get(result["outputs"]["sig"]["artifactId"])
    assert version["tags"]["goldsmith.sbom.packages"] == "2"
    assert version["tags"]["goldsmith.sbom.sha256"] == result["outputs"]["sig"]["sbom"]["sha256"]
    arm_double.keep(result["outputs"]["sig"]["artifactId"])
    assert "ran " in capsys.readouterr().out  # the trigger logs each Run Command's output (into the task log)
    vm_body = next(c for c in arm_double.run_commands)  # every script went to the build VM
    assert vm_body["vm"].endswith("/virtualMachines/goldsmith-vm")
    assert result["outputs"]["sig"]["artifactId"].endswith("/images/windows/versions/0.0.1")


def test_windows_network_allows_no_inbound_and_linux_only_ssh_from_the_configured_source(env, arm_double, tmp_path):
    seen: dict[str, Any] = {}
    for name, source in (("win", WINDOWS), ("lin", DEBIAN)):
        backend = AzureBackend(make_build(tmp_path, {"source": source, "distribute": [
            {"type": "VHD", "runOutputName": "vhd", "uri": "https://example.invalid/c"}]}, name=name))
        resolved = backend.resolve_source()
        drive(backend.prepare_staging)
        try:
            drive(lambda: backend.provision(resolved))
            nsg = arm_double.get(f"{backend.group}/providers/Microsoft.Network/networkSecurityGroups/goldsmith-nsg")
            seen[name] = nsg["properties"]["securityRules"]
        finally:
            drive(lambda: backend.cleanup(keep_vm=False))
    assert seen["win"] == []
    (rule,) = seen["lin"]
    assert rule["properties"]["sourceAddressPrefix"] == "127.0.0.0/8"
    assert rule["properties"]["destinationPortRange"] == "22" and rule["properties"]["access"] == "Allow"


def test_a_failing_windows_validation_names_its_output(env, arm_double, tmp_path):
    def guest(vm, command_id, script, parameters):
        if "Test-Path" in script:
            raise RuntimeError("marker missing")
        return "", ""

    arm_double.windows_run_command = guest
    backend = AzureBackend(make_build(tmp_path, {
        "source": WINDOWS,
        "validate": {"inVMValidations": [{"type": "PowerShell", "name": "check", "inline": ["Test-Path C:\\m"]}]},
        "distribute": [{"type": "VHD", "runOutputName": "vhd", "uri": "https://example.invalid/c"}]}))
    source = backend.resolve_source()
    drive(backend.prepare_staging)
    try:
        drive(lambda: backend.provision(source))
        with pytest.raises(BuildError, match=r"(?s)validate.0_check: validation failed: .*exited with -1.*marker "):
            drive(lambda: backend.validate(backend.build.plan.validate_steps()[0]))
        commands = arm_double.resources()
        assert not [c for c in commands if "/runCommands/" in c]  # removed, so a retry runs it again
    finally:
        drive(lambda: backend.cleanup(keep_vm=False))


# --- faults: each ends in success after a retry, or in a clear failure with nothing left behind ----------


def quick_build(tmp_path: Path, images: str, name: str = "quick", run_id: str = "manual__1") -> Build:
    """A Linux build without customizers, to a managed image: the shortest path through every step."""
    return make_build(tmp_path, {"source": DEBIAN, "distribute": [
        {"type": "ManagedImage", "runOutputName": "managed", "location": LOCATION,
         "imageId": f"{images}/providers/Microsoft.Compute/images/{name}"}]}, name=name, run_id=run_id)


def with_retries(call: Callable[[], Any], tries: int = 3) -> Any:
    """What Airflow does with a step's task: a BuildError fails it for good, anything else is retried."""
    for attempt in range(1, tries + 1):
        try:
            return drive(call)
        except BuildError:
            raise
        except Exception as e:
            if attempt == tries:
                raise
            logging.getLogger("test.build").warning("try %d failed (%s): retrying", attempt, e)


def run_build_with_retries(backend: AzureBackend) -> dict[str, Any]:
    source = backend.resolve_source()
    plan = backend.build.plan
    try:
        with_retries(backend.prepare_staging)
        with_retries(lambda: backend.provision(source))
        with_retries(backend.generalize)
        with_retries(backend.capture)
        return {s.name: with_retries(lambda: backend.distribute(s, source)) for s in plan.distribute_steps()}
    finally:
        with_retries(lambda: backend.cleanup(keep_vm=False))


@pytest.mark.parametrize("fault", [
    {"kind": "throttle", "method": "PUT", "path": "/virtualMachines/goldsmith-vm$", "retry_after": 1},
    {"kind": "error", "method": "PUT", "path": "/networkInterfaces/goldsmith-nic$", "times": 2},
    {"kind": "error", "method": "GET", "path": "/operations/", "times": 3},
    {"kind": "drop", "method": "PUT", "path": "/publicIPAddresses/goldsmith-pip$"},
    {"kind": "slow", "method": "GET", "path": "/virtualMachines/goldsmith-vm/instanceView$", "delay": 2},
], ids=lambda f: f"{f['kind']}-{f['method']}")
def test_transient_faults_are_retried_by_the_clients(env, arm_double, images, tmp_path, fault):
    injected = arm_double.inject(**fault)
    outputs = run_build_with_retries(AzureBackend(quick_build(tmp_path, images)))
    assert injected.hits == fault.get("times", 1)
    assert outputs["managed"]["artifactId"].endswith("/images/quick")
    arm_double.keep(outputs["managed"]["artifactId"])


@pytest.mark.parametrize("fault", [
    {"kind": "conflict", "method": "PUT", "path": "/images/goldsmith-image$", "code": "AnotherOperationInProgress"},
    {"kind": "lro_failed", "method": "PUT", "path": "/virtualMachines/goldsmith-vm$", "code": "OSProvisioningTimedOut"},
    {"kind": "drop_after", "method": "PUT", "path": "/virtualMachines/goldsmith-vm$"},
], ids=lambda f: f["kind"])
def test_faults_that_fail_a_try_succeed_on_the_tasks_retry(env, arm_double, images, tmp_path, fault, caplog):
    injected = arm_double.inject(**fault)
    outputs = run_build_with_retries(AzureBackend(quick_build(tmp_path, images)))
    assert injected.hits == 1
    assert "retrying" in caplog.text  # it did take a task retry
    assert outputs["managed"]["artifactId"].endswith("/images/quick")
    arm_double.keep(outputs["managed"]["artifactId"])


def test_a_lasting_failure_fails_clearly_and_cleanup_removes_everything(env, arm_double, images, tmp_path):
    arm_double.inject("lro_failed", "PUT", "/virtualMachines/goldsmith-vm$", times=10, code="SkuNotAvailable",
                      message="The requested size for resource is currently not available in location 'westus2'")
    with pytest.raises(RuntimeError, match="build VM: operation Failed: SkuNotAvailable: The requested size"):
        run_build_with_retries(AzureBackend(quick_build(tmp_path, images)))
    assert arm_double.leftovers() == []  # the staging group and all in it are gone


def test_throttled_polling_with_retry_after_is_honoured(env, arm_double, images, tmp_path):
    injected = arm_double.inject("throttle", "GET", "/operations/", times=2, retry_after=1)
    outputs = run_build_with_retries(AzureBackend(quick_build(tmp_path, images)))
    assert injected.hits == 2
    arm_double.keep(outputs["managed"]["artifactId"])


# --- a worker killed mid-step -----------------------------------------------------------------------------

WORKER = """
import asyncio, logging, sys
logging.basicConfig(level=logging.INFO)
from goldsmith.azure.backend import AzureBackend
from goldsmith.core import Build, Pending, trigger_for
from goldsmith.operators.steps import _first_event
from goldsmith.template.loader import load_template
from goldsmith.template.plan import make_plan

backend = AzureBackend(Build(make_plan(load_template(sys.argv[1])), "quick", "manual__1", {}))
source = backend.resolve_source()
while True:
    try:
        backend.provision(source)
        break
    except Pending as pending:
        print("PENDING", pending.what, flush=True)
        asyncio.run(_first_event(trigger_for(pending.wait)))
"""


def test_a_killed_worker_is_reattached_on_retry_not_resubmitted(env, arm_double, images, tmp_path, caplog):
    build = quick_build(tmp_path, images)
    backend = AzureBackend(build)
    drive(backend.prepare_staging)
    arm_double.set_latency("virtualMachines/create", seconds=6, polls=1)
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / "quick.json")], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        for line in worker.stdout:  # wait until it waits on the VM, then kill it
            if line.startswith("PENDING build VM"):
                break
        else:
            pytest.fail(f"the worker never waited on the VM (exit {worker.wait()})")
    finally:
        worker.kill()
        worker.wait()
    caplog.set_level(logging.INFO)
    try:
        result = drive(lambda: backend.provision(backend.resolve_source()))  # the task's retry
        assert result["vm"].endswith("/virtualMachines/goldsmith-vm")
        assert "build VM is Creating: waiting for it (an earlier try started it)" in caplog.text
        assert puts(arm_double, "/virtualMachines/goldsmith-vm") == 1
    finally:
        drive(lambda: backend.cleanup(keep_vm=False))


# --- staging groups, errorHandling ------------------------------------------------------------------------


def test_a_named_empty_staging_group_keeps_its_own_resources_and_tags(env, arm_double, images, tmp_path):
    group = f"/subscriptions/{arm_double.subscription_id}/resourceGroups/team-staging"
    arm_double.seed(group, {"location": LOCATION, "tags": {"owner": "team"}})
    build = make_build(tmp_path, {**quick_build(tmp_path, images).plan.template.properties.model_dump(
        mode="json", by_alias=True, exclude_none=True), "stagingResourceGroup": group}, name="quick")
    outputs = run_build_with_retries(AzureBackend(build))
    assert [r for r in arm_double.resources() if r.startswith(group)] == [group]  # only what the build made went
    tags = arm_double.get(group)["tags"]
    assert tags["owner"] == "team" and tags["usedBy"] == "goldsmith" and tags["imageTemplateName"] == "quick"
    assert not [k for k in tags if k.startswith("goldsmith.")]
    arm_double.keep(outputs["managed"]["artifactId"])


def test_a_named_staging_group_must_be_empty_and_in_the_build_region(env, arm_double, images, tmp_path):
    group = f"/subscriptions/{arm_double.subscription_id}/resourceGroups/busy"
    arm_double.seed(group, {"location": LOCATION})
    arm_double.seed(f"{group}/providers/Microsoft.Network/networkSecurityGroups/theirs", {"location": LOCATION})
    far = f"/subscriptions/{arm_double.subscription_id}/resourceGroups/far"
    arm_double.seed(far, {"location": "eastus"})
    props = {"source": DEBIAN, "distribute": [{"type": "VHD", "runOutputName": "v", "uri": "https://x.invalid/c"}]}
    with pytest.raises(BuildError, match=r"stagingResourceGroup: .*/busy must be empty, as AIB requires; it holds 1"):
        AzureBackend(make_build(tmp_path, {**props, "stagingResourceGroup": group})).prepare_staging()
    with pytest.raises(BuildError, match=r"stagingResourceGroup: .*/far is in eastus, the build in westus2"):
        AzureBackend(make_build(tmp_path, {**props, "stagingResourceGroup": far})).prepare_staging()
    other = "/subscriptions/11111111-1111-1111-1111-111111111111/resourceGroups/x"
    with pytest.raises(BuildError, match="must be a resource group id in the connection's subscription"):
        AzureBackend(make_build(tmp_path, {**props, "stagingResourceGroup": other})).prepare_staging()


def test_errorhandling_abort_keeps_the_vm_for_debugging(env, arm_double, images, tmp_path, caplog):
    backend = AzureBackend(make_build(tmp_path, {
        "source": DEBIAN,
        "customize": [{"type": "Shell", "name": "breaks", "inline": ["echo about-to-fail", "exit 3"]}],
        "errorHandling": {"onCustomizerError": "abort"},
        "distribute": [{"type": "VHD", "runOutputName": "v", "uri": "https://x.invalid/c"}]}))
    source = backend.resolve_source()
    drive(backend.prepare_staging)
    drive(lambda: backend.provision(source))
    with pytest.raises(BuildError, match=r"(?s)customize.0_breaks: customizer 'breaks' failed: exit code 3.*about-to"):
        backend.customize(backend.build.plan.customize_steps()[0])
    caplog.set_level(logging.INFO)
    kept = drive(lambda: backend.cleanup(keep_vm=True))
    assert kept["removed"] is False and kept["kept"] == str(backend.group)
    assert "ssh -i " in caplog.text and "goldsmith@127." in caplog.text
    tags = arm_double.get(str(backend.group))["tags"]
    assert tags["goldsmith.expiry"] == kept["until"]  # the janitor deletes it after the debugging window
    assert arm_double.get(f"{backend.group}/providers/Microsoft.Compute/virtualMachines/goldsmith-vm")
    drive(lambda: backend.cleanup(keep_vm=False))  # done debugging


def test_a_template_subnet_gets_no_public_ip_and_ssh_goes_to_the_private_address(env, arm_double, images, tmp_path):
    vnet = f"{images}/providers/Microsoft.Network/virtualNetworks/corp"
    arm_double.seed(vnet, {"location": LOCATION, "properties": {
        "addressSpace": {"addressPrefixes": ["10.9.0.0/16"]},
        "subnets": [{"name": "builds", "properties": {"addressPrefix": "10.9.1.0/24"}}]}})
    backend = AzureBackend(make_build(tmp_path, {
        "source": DEBIAN, "vmProfile": {"vnetConfig": {"subnetId": f"{vnet}/subnets/builds"}},
        "customize": [{"type": "Shell", "inline": ["hostname"]}],
        "distribute": [{"type": "VHD", "runOutputName": "v", "uri": "https://x.invalid/c"}]}))
    source = backend.resolve_source()
    drive(backend.prepare_staging)
    try:
        provisioned = drive(lambda: backend.provision(source))
        nic = arm_double.get(f"{backend.group}/providers/Microsoft.Network/networkInterfaces/goldsmith-nic")
        config = nic["properties"]["ipConfigurations"][0]["properties"]
        assert provisioned["address"] == config["privateIPAddress"] and "publicIPAddress" not in config
        assert not [r for r in arm_double.resources() if "publicIPAddresses" in r or "networkSecurityGroups" in r]
        drive(lambda: backend.customize(backend.build.plan.customize_steps()[0]))  # SSH over the private address
    finally:
        drive(lambda: backend.cleanup(keep_vm=False))
    arm_double.keep(vnet)  # the team's network (its inline subnet is not marked seeded by the double)


# --- sources, VM profile, versions ------------------------------------------------------------------------


def test_vm_profile_and_source_choices_reach_the_vm(env, arm_double, images, tmp_path):
    identity = f"{images}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/builder"
    backend = AzureBackend(make_build(tmp_path, {
        "source": {"type": "PlatformImage", "publisher": "Debian", "offer": "debian-12", "sku": "12-gen2",
                   "version": "0.20241004.1901"},
        "vmProfile": {"osDiskSizeGB": 64, "userAssignedIdentities": [identity]},
        "distribute": [{"type": "VHD", "runOutputName": "v", "uri": "https://x.invalid/c"}]}))
    source = backend.resolve_source()
    assert (source["exactVersion"], source["hyperVGeneration"]) == ("0.20241004.1901", "V2")
    body = backend._vm_body(source)
    assert body["properties"]["hardwareProfile"]["vmSize"] == "Standard_D2ds_v4"  # AIB's Gen2 default
    assert body["properties"]["storageProfile"]["osDisk"]["diskSizeGB"] == 64
    assert body["identity"] == {"type": "UserAssigned", "userAssignedIdentities": {identity: {}}}
    gen1 = AzureBackend(make_build(tmp_path, {"source": DEBIAN, "distribute": [
        {"type": "VHD", "runOutputName": "v", "uri": "https://x.invalid/c"}]}, name="gen1"))
    assert gen1._vm_size(gen1.resolve_source()) == "Standard_D1_v2"


def test_marketplace_images_with_a_plan_need_planinfo(env, arm_double, tmp_path):
    cis = {"type": "PlatformImage", "publisher": "center-for-internet-security-inc",
           "offer": "cis-ubuntu-linux-2204-l1", "sku": "cis-ubuntu2204-l1", "version": "latest"}
    props = {"distribute": [{"type": "VHD", "runOutputName": "v", "uri": "https://x.invalid/c"}]}
    with pytest.raises(BuildError, match=r'source.planInfo: .* add "planInfo": \{"planName": "cis-ubuntu2204-l1"'):
        AzureBackend(make_build(tmp_path, {"source": cis, **props})).resolve_source()
    plan = {"planName": "cis-ubuntu2204-l1", "planProduct": "cis-ubuntu-linux-2204-l1",
            "planPublisher": "center-for-internet-security-inc"}
    backend = AzureBackend(make_build(tmp_path, {"source": {**cis, "planInfo": plan}, **props}))
    source = backend.resolve_source()
    assert source["exactVersion"] == "1.0.14"
    assert backend._vm_body(source)["plan"] == {"name": plan["planName"], "product": plan["planProduct"],
                                                 "publisher": plan["planPublisher"]}


def test_gallery_source_latest_skips_excluded_versions_and_versioning_numbers_the_next(env, arm_double, images,
                                                                                        tmp_path):
    definition = f"{images}/providers/Microsoft.Compute/galleries/golden/images/linux"
    base = run_build_with_retries(AzureBackend(make_build(tmp_path, {"source": DEBIAN, "distribute": [
        {"type": "SharedImage", "runOutputName": "sig", "galleryImageId": f"{definition}/versions/1.2.0"}]},
        name="base")))
    excluded = run_build_with_retries(AzureBackend(make_build(tmp_path, {"source": DEBIAN, "distribute": [
        {"type": "SharedImage", "runOutputName": "sig", "galleryImageId": definition, "excludeFromLatest": True,
         "versioning": {"scheme": "Latest", "major": 1}}]}, name="excluded")))
    assert excluded["sig"]["artifactId"] == f"{definition}/versions/1.2.1"  # next patch under major 1

    child = AzureBackend(make_build(tmp_path, {
        "source": {"type": "SharedImageVersion", "imageVersionId": f"{definition}/versions/latest"},
        "distribute": [{"type": "SharedImage", "runOutputName": "sig", "galleryImageId": definition,
                        "versioning": {"scheme": "Source"}}]}, name="child"))
    source = child.resolve_source()
    assert source["exactVersion"] == "1.2.0"  # 1.2.1 is excluded from latest
    with pytest.raises(BuildError, match=r"image version 1.2.0 already exists \(versioning Source\); AIB never "):
        run_build_with_retries(child)
    arm_double.keep(base["sig"]["artifactId"], excluded["sig"]["artifactId"])


def test_a_retried_distribute_adopts_its_version_instead_of_publishing_another(env, arm_double, images, tmp_path):
    definition = f"{images}/providers/Microsoft.Compute/galleries/golden/images/linux"
    backend = AzureBackend(make_build(tmp_path, {"source": DEBIAN, "distribute": [
        {"type": "SharedImage", "runOutputName": "sig", "galleryImageId": definition}]}))
    source = backend.resolve_source()
    step = backend.build.plan.distribute_steps()[0]
    try:
        for call in (backend.prepare_staging, lambda: backend.provision(source), backend.generalize, backend.capture):
            drive(call)
        first = drive(lambda: backend.distribute(step, source))
        again = drive(lambda: backend.distribute(step, source))  # a retry after the task lost its result
        assert first == again
        assert puts(arm_double, "/versions/0.0.1") == 1
    finally:
        drive(lambda: backend.cleanup(keep_vm=False))
    arm_double.keep(first["artifactId"])


@pytest.mark.parametrize("properties, error", [
    ({"source": DEBIAN, "customize": [{"type": "PowerShell", "inline": ["x"]}]},
     r"properties.customize\[0\]: 'PowerShell' does not run on a Linux source image"),
    ({"source": WINDOWS, "customize": [{"type": "Shell", "inline": ["x"]}]},
     r"properties.customize\[0\]: 'Shell' does not run on a Windows source image"),
    ({"source": {**DEBIAN, "sku": "13"}}, r"source: no versions of Debian:debian-12:13 in westus2"),
    ({"source": {**DEBIAN, "version": "9.9.9"}}, r"source: version '9.9.9' of Debian:debian-12:12 is not in westus2"),
    ({"source": {"type": "ManagedImage", "imageId": "/subscriptions/x/resourceGroups/y/providers/Microsoft.Compute/"
                                                    "images/missing"}}, r"source.imageId: managed image .* does not"),
    ({"source": {"type": "SharedImageVersion", "imageVersionId": "not-an-id"}},
     r"source.imageVersionId: 'not-an-id' is not an ARM resource id"),
], ids=["powershell-on-linux", "shell-on-windows", "no-sku", "no-version", "no-image", "bad-id"])
def test_bad_input_is_a_clear_error_at_plan_time(env, arm_double, tmp_path, properties, error):
    backend = AzureBackend(make_build(tmp_path, {
        **properties, "distribute": [{"type": "VHD", "runOutputName": "v", "uri": "https://x.invalid/c"}]}))
    with pytest.raises(BuildError, match=error):
        backend.resolve_source()


def test_a_template_without_location_is_refused(env, arm_double, tmp_path):
    build = make_build(tmp_path, {"source": DEBIAN, "distribute": [{"type": "VHD", "runOutputName": "v"}]},
                       location=None)
    with pytest.raises(BuildError, match=r"location: the azure backend builds in the template's region; set"):
        AzureBackend(build).resolve_source()


def test_a_vhd_without_uri_goes_to_staging_storage_which_cleanup_keeps(env, arm_double, azurite, tmp_path, caplog):
    backend = AzureBackend(make_build(tmp_path, {"source": DEBIAN, "distribute": [{"type": "VHD",
                                                                                  "runOutputName": "vhd"}]}))
    caplog.set_level(logging.INFO)
    outputs = run_build_with_retries(backend)
    uri = outputs["vhd"]["artifactUri"]
    account = f"{backend.group}/providers/Microsoft.Storage/storageAccounts/{backend._storage_account}"
    endpoint = arm_double.get(account)["properties"]["primaryEndpoints"]["blob"]
    assert uri.startswith(endpoint + "vhds/") and uri.endswith(".vhd")
    assert sorted(arm_double.resources()) == [str(backend.group), account]  # the rest of the build is gone
    assert "goldsmith.expiry" not in arm_double.get(str(backend.group))["tags"]  # the janitor leaves it alone
    assert "keeps storage account" in caplog.text
    arm_double.keep(str(backend.group))


def test_a_worker_without_the_ssh_key_installs_a_new_one_through_run_command(env, arm_double, tmp_path, caplog):
    backend = AzureBackend(make_build(tmp_path, {
        "source": DEBIAN, "customize": [{"type": "Shell", "inline": ["echo still-reachable"]}],
        "distribute": [{"type": "VHD", "runOutputName": "v", "uri": "https://x.invalid/c"}]}))
    source = backend.resolve_source()
    drive(backend.prepare_staging)
    try:
        drive(lambda: backend.provision(source))
        for name in ("id_ed25519", "id_ed25519.pub"):  # as on another worker
            (backend.local / name).unlink()
        caplog.set_level(logging.INFO)
        drive(lambda: backend.customize(backend.build.plan.customize_steps()[0]))
        assert "installing a new one" in caplog.text and "still-reachable" in caplog.text
        assert any("authorized_keys" in c["script"] for c in arm_double.run_commands)
        assert not [r for r in arm_double.resources() if "/runCommands/" in r]
    finally:
        drive(lambda: backend.cleanup(keep_vm=False))


def test_a_named_staging_group_that_does_not_exist_is_created_and_deleted(env, arm_double, tmp_path):
    group = f"/subscriptions/{arm_double.subscription_id}/resourceGroups/named-staging"
    backend = AzureBackend(make_build(tmp_path, {"source": DEBIAN, "stagingResourceGroup": group, "distribute": [
        {"type": "VHD", "runOutputName": "v", "uri": "https://x.invalid/c"}]}))
    assert drive(backend.prepare_staging) == {"stagingResourceGroup": group, "created": True}
    assert arm_double.get(group)["tags"]["createdBy"] == "goldsmith"
    assert drive(lambda: backend.cleanup(keep_vm=False))["removed"] is True
    assert arm_double.get(group) is None  # as AIB deletes a staging group it created

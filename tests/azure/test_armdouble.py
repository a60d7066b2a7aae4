"""The ARM test double, proven with the real azure-identity, azure-mgmt-* and azure-storage-blob clients
(sync and aio): what a client sees from it is what it would see from Azure."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests
from azure.core.exceptions import (ClientAuthenticationError, HttpResponseError, ResourceNotFoundError,
                                   ServiceRequestError, ServiceResponseError)
from azure.identity import (ClientAssertionCredential, ClientSecretCredential, ManagedIdentityCredential,
                            WorkloadIdentityCredential)
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.network import NetworkManagementClient
from azure.mgmt.resource.resources import ResourceManagementClient
from azure.mgmt.storage import StorageManagementClient
from azure.storage.blob import BlobClient, BlobServiceClient
from sshd_fixture import is_running

from armdouble import ArmDouble, fixed_vhd
from goldsmith.communicator import SSHCommunicator

LOCATION = "westus2"
DEBIAN = {"publisher": "Debian", "offer": "debian-12", "sku": "12", "version": "latest"}
WINDOWS = {"publisher": "MicrosoftWindowsServer", "offer": "WindowsServer", "sku": "2019-Datacenter",
           "version": "latest"}


class Clients:
    """The real management clients, configured as azure_credentials says (fast retries for the fault tests)."""

    def __init__(self, creds, **options):
        credential = creds.credential()
        kwargs = {**creds.client_kwargs(), "retry_backoff_factor": 0.01, **options}
        self.resources = ResourceManagementClient(credential, creds.subscription_id, **kwargs)
        self.network = NetworkManagementClient(credential, creds.subscription_id, **kwargs)
        self.compute = ComputeManagementClient(credential, creds.subscription_id, **kwargs)
        self.storage = StorageManagementClient(credential, creds.subscription_id, **kwargs)


@pytest.fixture
def arm(azure_credentials) -> Clients:
    return Clients(azure_credentials)


@pytest.fixture(scope="module")
def ssh_key(tmp_path_factory) -> Path:
    key = tmp_path_factory.mktemp("ssh") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    return key


def nsg_body(ssh_source: str) -> dict:
    return {"location": LOCATION, "properties": {"securityRules": [{"name": "ssh", "properties": {
        "protocol": "Tcp", "access": "Allow", "direction": "Inbound", "priority": 100,
        "sourceAddressPrefix": ssh_source, "sourcePortRange": "*", "destinationAddressPrefix": "*",
        "destinationPortRange": "22"}}]}}


def network_for_vm(arm: Clients, group: str, *, public_ip: bool = True,
                   ssh_source: str = "127.0.0.1") -> tuple[dict, dict | None]:
    """vnet + subnet, NSG allowing SSH from `ssh_source`, optional public IP, NIC; returns (nic, public ip)."""
    vnet = arm.network.virtual_networks.begin_create_or_update(group, "vnet", {
        "location": LOCATION, "properties": {
            "addressSpace": {"addressPrefixes": ["10.0.0.0/16"]},
            "subnets": [{"name": "default", "properties": {"addressPrefix": "10.0.0.0/24"}}]}}).result()
    nsg = arm.network.network_security_groups.begin_create_or_update(group, "nsg", nsg_body(ssh_source)).result()
    pip = None
    config = {"subnet": {"id": vnet.subnets[0].id}}
    if public_ip:
        pip = arm.network.public_ip_addresses.begin_create_or_update(group, "pip", {
            "location": LOCATION, "sku": {"name": "Standard"},
            "properties": {"publicIPAllocationMethod": "Static"}}).result().as_dict()
        config["publicIPAddress"] = {"id": pip["id"]}
    nic = arm.network.network_interfaces.begin_create_or_update(group, "nic", {
        "location": LOCATION, "properties": {"networkSecurityGroup": {"id": nsg.id},
                                             "ipConfigurations": [{"name": "ipconfig", "properties": config}]}})
    return nic.result().as_dict(), pip


def linux_vm_body(nic_id: str, key: Path, user: str = "packer", image: dict = DEBIAN) -> dict:
    return {"location": LOCATION, "properties": {
        "hardwareProfile": {"vmSize": "Standard_D1_v2"},
        "storageProfile": {"imageReference": dict(image), "osDisk": {"createOption": "FromImage",
                                                                     "deleteOption": "Delete"}},
        "osProfile": {"computerName": "build", "adminUsername": user, "linuxConfiguration": {
            "disablePasswordAuthentication": True,
            "ssh": {"publicKeys": [{"path": f"/home/{user}/.ssh/authorized_keys",
                                    "keyData": Path(f"{key}.pub").read_text().strip()}]}}},
        "networkProfile": {"networkInterfaces": [{"id": nic_id}]}}}


def linux_vm(arm: Clients, group: str, key: Path) -> tuple[dict, dict, dict]:
    """A running Linux VM with a public IP; returns (vm, nic, public ip) as REST JSON."""
    nic, pip = network_for_vm(arm, group)
    vm = arm.compute.virtual_machines.begin_create_or_update(group, "vm", linux_vm_body(nic["id"], key)).result()
    return vm.as_dict(), nic, pip


def ssh(host: str, key: Path, user: str = "packer") -> SSHCommunicator:
    comm = SSHCommunicator(host, 22, user, key)
    comm.wait_until_ready(timeout=20)
    return comm


def run(comm: SSHCommunicator, command: str) -> tuple[int | None, list[str]]:
    lines: list[str] = []
    result = comm.run(command, on_line=lines.append, timeout=30)
    return result.exit_code, lines


def listening(host: str, port: int = 22) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def statuses(arm_double: ArmDouble, method: str, path_end: str) -> list[int | None]:
    """The statuses the double answered `method` requests for paths ending in `path_end` with."""
    return [c.status for c in arm_double.calls if c.method == method and c.path.lower().endswith(path_end.lower())]


def error_code(excinfo) -> str:
    return excinfo.value.error.code


# -- identity -----------------------------------------------------------------------------------


def test_client_secret_and_assertion_credentials_get_tokens(azure_credentials):
    c = azure_credentials
    assert c.credential().get_token("https://management.azure.com/.default").token.startswith("armdouble.")
    assertion = ClientAssertionCredential(c.tenant_id, c.client_id, lambda: c.federated_token,
                                          authority=c.authority, disable_instance_discovery=True,
                                          connection_verify=c.ca_bundle)
    assert assertion.get_token("https://management.azure.com/.default").token


def test_managed_and_workload_identities_get_tokens_arm_accepts(azure_credentials, managed_identity_env,
                                                                 workload_identity_env):
    c = azure_credentials
    for credential in (ManagedIdentityCredential(connection_verify=c.ca_bundle),
                       WorkloadIdentityCredential(disable_instance_discovery=True, connection_verify=c.ca_bundle)):
        client = ResourceManagementClient(credential, c.subscription_id, **c.client_kwargs())
        assert list(client.resource_groups.list()) == []


def test_wrong_secret_and_missing_token_are_refused(azure_credentials, arm_double):
    c = azure_credentials
    wrong = ClientSecretCredential(c.tenant_id, c.client_id, "not-the-secret", authority=c.authority,
                                   disable_instance_discovery=True, connection_verify=c.ca_bundle)
    with pytest.raises(ClientAuthenticationError, match="AADSTS7000215"):
        wrong.get_token("https://management.azure.com/.default")
    response = requests.get(f"{c.resource_manager}/subscriptions/{c.subscription_id}/resourcegroups",
                            params={"api-version": "2025-04-01"}, verify=c.ca_bundle)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "AuthenticationFailed"
    assert "Bearer authorization_uri" in response.headers["WWW-Authenticate"]


def test_the_airflow_connection_carries_what_a_client_needs(azure_connection, azure_credentials):
    from airflow.providers.microsoft.azure.hooks.base_azure import AzureBaseHook
    conn = AzureBaseHook(conn_id=azure_connection.conn_id).get_connection(azure_connection.conn_id)
    extra = conn.extra_dejson
    assert (conn.login, conn.password, extra["tenantId"]) == (azure_credentials.client_id,
                                                              azure_credentials.client_secret,
                                                              azure_credentials.tenant_id)
    credential = ClientSecretCredential(
        extra["tenantId"], conn.login, conn.password, authority=extra["authority"],
        disable_instance_discovery=True, connection_verify=extra["connection_verify"])
    client = ResourceManagementClient(credential, extra["subscriptionId"], base_url=extra["resource_manager_endpoint"],
                                      connection_verify=extra["connection_verify"])
    assert list(client.resource_groups.list()) == []


# -- resource groups -------------------------------------------------------------------------------


def test_resource_groups(arm, arm_double):
    groups = arm.resources.resource_groups
    created = groups.create_or_update("IT_images_tpl_1", {"location": "West US 2", "tags": {"goldsmith": "1"}})
    assert (created.location, created.properties.provisioning_state) == ("westus2", "Succeeded")
    groups.create_or_update("other", {"location": LOCATION})
    assert groups.check_existence("IT_images_tpl_1") and not groups.check_existence("nope")
    assert [g.name for g in groups.list(filter="tagName eq 'goldsmith' and tagValue eq '1'")] == ["IT_images_tpl_1"]
    assert [g.name for g in groups.list(filter="tagName eq 'goldsmith' and tagValue eq '2'")] == []
    with pytest.raises(HttpResponseError) as moved:
        groups.create_or_update("other", {"location": "eastus"})
    assert (moved.value.status_code, error_code(moved)) == (409, "InvalidResourceGroupLocation")

    arm.network.public_ip_addresses.begin_create_or_update("other", "pip", {"location": LOCATION}).result()
    assert [r.type for r in arm.resources.resources.list_by_resource_group("other")] == [
        "Microsoft.Network/publicIPAddresses"]

    arm_double.set_latency("resourceGroups/delete", seconds=1)
    poller = groups.begin_delete("other")
    assert groups.get("other").properties.provisioning_state == "Deleting"
    poller.result()
    with pytest.raises(ResourceNotFoundError) as gone:
        groups.get("other")
    assert error_code(gone) == "ResourceGroupNotFound"
    with pytest.raises(ResourceNotFoundError) as no_group:
        arm.network.virtual_networks.get("other", "vnet")
    assert error_code(no_group) == "ResourceGroupNotFound"
    groups.begin_delete("IT_images_tpl_1").result()
    assert arm_double.resources() == []


# -- the whole AIB build process -----------------------------------------------------------------


def test_build_process_end_to_end(arm, arm_double, ssh_key):
    arm.resources.resource_groups.create_or_update("staging", {"location": LOCATION})
    vm, nic, pip = linux_vm(arm, "staging", ssh_key)
    assert vm["properties"]["provisioningState"] == "Succeeded"
    # The VM create went through ARM's protocol: 201 + Azure-AsyncOperation, then status polls.
    put = next(c for c in arm_double.calls if c.method == "PUT" and c.path.endswith("/virtualMachines/vm"))
    assert put.status == 201
    assert any("/providers/Microsoft.Compute/locations/westus2/operations/" in c.path for c in arm_double.calls)
    assert vm["properties"]["storageProfile"]["imageReference"]["exactVersion"] == "0.20250305.2040"
    view = arm.compute.virtual_machines.get("staging", "vm", expand="instanceView").instance_view
    assert "PowerState/running" in [s.code for s in view.statuses]

    # The public and the private IP both lead to the VM's sshd, as the admin user with the key.
    public_ip = arm.network.public_ip_addresses.get("staging", "pip").ip_address
    assert public_ip == pip["properties"]["ipAddress"] and public_ip.startswith("127.")
    private_ip = nic["properties"]["ipConfigurations"][0]["properties"]["privateIPAddress"]
    with ssh(public_ip, ssh_key) as comm:
        assert run(comm, "id -un; sudo id -u; echo customized | sudo tee /etc/golden-marker") == (
            0, ["packer", "0", "customized"])
    with ssh(private_ip, ssh_key) as comm:
        assert run(comm, "cat /etc/golden-marker") == (0, ["customized"])
    assert not Path("/etc/golden-marker").exists()  # the guest's /etc is its own

    # Run Command runs as root in the same guest.
    result = arm.compute.virtual_machines.begin_run_command("staging", "vm", {
        "commandId": "RunShellScript", "script": ["cat /etc/golden-marker", "echo $GREETING >&2"],
        "parameters": [{"name": "GREETING", "value": "hello"}]}).result()
    assert result.value[0].code == "ProvisioningState/succeeded"
    assert result.value[0].message == "Enable succeeded: \n[stdout]\ncustomized\n\n[stderr]\nhello\n\n"

    # In use: ARM refuses to delete the NIC of a VM, or the public IP of a NIC.
    with pytest.raises(HttpResponseError) as nic_in_use:
        arm.network.network_interfaces.begin_delete("staging", "nic").result()
    assert error_code(nic_in_use) == "NicInUse"
    with pytest.raises(HttpResponseError) as ip_in_use:
        arm.network.public_ip_addresses.begin_delete("staging", "pip").result()
    assert error_code(ip_in_use) == "PublicIPAddressCannotBeDeleted"

    # generalize refuses a running VM; deallocate powers the guest off.
    with pytest.raises(HttpResponseError) as running:
        arm.compute.virtual_machines.generalize("staging", "vm")
    assert error_code(running) == "OperationNotAllowed"
    guest_pid = arm_double.vm_guest(vm["id"]).pid
    arm.compute.virtual_machines.begin_deallocate("staging", "vm").result()
    assert not is_running(guest_pid) and not listening(public_ip)
    arm.compute.virtual_machines.generalize("staging", "vm")
    statuses = [s.code for s in arm.compute.virtual_machines.instance_view("staging", "vm").statuses]
    assert {"PowerState/deallocated", "OSState/generalized"} <= set(statuses)

    # Capture and distribute: managed image, gallery, definition, version replicated to two regions.
    image = arm.compute.images.begin_create_or_update("staging", "golden", {
        "location": LOCATION, "properties": {"sourceVirtualMachine": {"id": vm["id"]}}}).result()
    assert image.storage_profile.os_disk.os_state == "Generalized"
    arm.resources.resource_groups.create_or_update("images", {"location": LOCATION})
    gallery = arm.compute.galleries.begin_create_or_update("images", "golden_gallery", {
        "location": LOCATION, "properties": {}}).result()
    assert gallery.identifier.unique_name
    arm.compute.gallery_images.begin_create_or_update("images", "golden_gallery", "debian", {
        "location": LOCATION, "properties": {"osType": "Linux", "osState": "Generalized", "hyperVGeneration": "V1",
                                             "identifier": {"publisher": "me", "offer": "golden", "sku": "12"}}}).result()
    arm_double.set_latency("versions/create", polls=2)
    poller = arm.compute.gallery_image_versions.begin_create_or_update("images", "golden_gallery", "debian", "1.0.0", {
        "location": LOCATION, "properties": {
            "publishingProfile": {"targetRegions": [{"name": LOCATION}, {"name": "eastus"}]},
            "storageProfile": {"source": {"id": image.id}}}}, polling_interval=0.01)
    seen = []
    while not poller.done():
        status = arm.compute.gallery_image_versions.get("images", "golden_gallery", "debian", "1.0.0",
                                                        expand="ReplicationStatus").replication_status
        seen.append(tuple(s.progress for s in status.summary))
    version = poller.result()
    assert seen[0] < (100, 100) and len(set(seen)) > 1, seen
    assert version.provisioning_state == "Succeeded"
    final = arm.compute.gallery_image_versions.get("images", "golden_gallery", "debian", "1.0.0",
                                                   expand="ReplicationStatus").replication_status
    assert final.aggregated_state == "Completed"
    assert [(s.region, s.state, s.progress) for s in final.summary] == [
        (LOCATION, "Completed", 100), ("eastus", "Completed", 100)]

    # A new VM can start from the version, in a region it was replicated to, and not elsewhere.
    nic2 = arm.network.network_interfaces.begin_create_or_update("staging", "nic2", {
        "location": LOCATION, "properties": {"ipConfigurations": [{"name": "ip", "properties": {
            "subnet": {"id": nic["properties"]["ipConfigurations"][0]["properties"]["subnet"]["id"]}}}]}}).result()
    body = linux_vm_body(nic2.id, ssh_key)
    body["properties"]["storageProfile"]["imageReference"] = {"id": version.id}
    body["location"] = "northeurope"
    with pytest.raises(ResourceNotFoundError, match="cannot be found in 'northeurope' region"):
        arm.compute.virtual_machines.begin_create_or_update("staging", "vm2", body)

    # The gallery cannot be deleted before what is inside it; cleanup in AIB's order leaves nothing.
    with pytest.raises(HttpResponseError) as nested:
        arm.compute.galleries.begin_delete("images", "golden_gallery").result()
    assert error_code(nested) == "CannotDeleteResource"
    arm.compute.gallery_image_versions.begin_delete("images", "golden_gallery", "debian", "1.0.0").result()
    arm.compute.gallery_images.begin_delete("images", "golden_gallery", "debian").result()
    arm.compute.galleries.begin_delete("images", "golden_gallery").result()
    arm.compute.images.begin_delete("staging", "golden").result()
    arm.compute.virtual_machines.begin_delete("staging", "vm").result()  # the OS disk goes too (deleteOption)
    for name in ("nic", "nic2"):
        arm.network.network_interfaces.begin_delete("staging", name).result()
    arm.network.public_ip_addresses.begin_delete("staging", "pip").result()
    arm.network.network_security_groups.begin_delete("staging", "nsg").result()
    arm.network.virtual_networks.begin_delete("staging", "vnet").result()
    assert [r.split("/")[-1] for r in arm_double.resources()] == ["images", "staging"]
    arm.resources.resource_groups.begin_delete("staging").result()
    arm.resources.resource_groups.begin_delete("images").result()
    assert not os.path.exists(arm_double.directory / "vms" / vm["properties"]["vmId"])


def test_nsg_rules_decide_which_addresses_ssh_reaches(arm, arm_double, ssh_key):
    arm.resources.resource_groups.create_or_update("rg", {"location": LOCATION})
    nic, pip = network_for_vm(arm, "rg", ssh_source="203.0.113.7/32")  # not this host
    vm = arm.compute.virtual_machines.begin_create_or_update("rg", "vm", linux_vm_body(nic["id"], ssh_key)).result()
    private_ip = nic["properties"]["ipConfigurations"][0]["properties"]["privateIPAddress"]
    public_ip = pip["properties"]["ipAddress"]
    assert listening(private_ip) and not listening(public_ip)  # the VNet is allowed in by default, the Internet not
    arm.network.network_security_groups.begin_create_or_update("rg", "nsg", nsg_body("127.0.0.0/8")).result()
    arm.compute.virtual_machines.begin_restart("rg", "vm").result()
    assert listening(public_ip)
    assert arm_double.vm_guest(vm.id).addresses == [private_ip, public_ip]
    arm.resources.resource_groups.begin_delete("rg").result()


def test_vm_validation_errors(arm, arm_double, ssh_key):
    arm_double.seed(f"/subscriptions/{arm_double.subscription_id}/resourceGroups/rg", {"location": LOCATION})
    nic, _ = network_for_vm(arm, "rg", public_ip=False)

    def refused(body: dict) -> HttpResponseError:
        with pytest.raises(HttpResponseError) as e:
            arm.compute.virtual_machines.begin_create_or_update("rg", "vm", body)
        return e.value

    assert refused(linux_vm_body(nic["id"], ssh_key, user="root")).error.message == \
        "The Admin Username specified is not allowed."
    unknown = dict(DEBIAN, sku="13")
    assert refused(linux_vm_body(nic["id"], ssh_key, image=unknown)).error.code == "PlatformImageNotFound"
    cis = {"publisher": "center-for-internet-security-inc", "offer": "cis-ubuntu-linux-2204-l1",
           "sku": "cis-ubuntu2204-l1", "version": "latest"}
    assert refused(linux_vm_body(nic["id"], ssh_key, image=cis)).error.code == "VMMarketplaceInvalidInput"
    body = linux_vm_body(nic["id"], ssh_key)
    body["properties"]["osProfile"]["linuxConfiguration"]["ssh"]["publicKeys"][0]["path"] = "/root/.ssh/keys"
    assert "Destination path for SSH public keys" in refused(body).error.message
    arm_double.keep(f"/subscriptions/{arm_double.subscription_id}/resourceGroups/rg")


# -- marketplace ---------------------------------------------------------------------------------


def test_marketplace_versions(arm):
    images = arm.compute.virtual_machine_images
    versions = [v.name for v in images.list(LOCATION, "Debian", "debian-12", "12-gen2")]
    assert versions == ["0.20240717.1810", "0.20241004.1901", "0.20250305.2040"]
    assert [v.name for v in images.list(LOCATION, "Debian", "debian-12", "12", top=1, orderby="name desc")] == [
        "0.20250305.2040"]
    version = images.get(LOCATION, "debian", "debian-12", "12-gen2", "0.20241004.1901")
    assert (version.os_disk_image.operating_system, version.hyper_v_generation) == ("Linux", "V2")
    assert images.get(LOCATION, "center-for-internet-security-inc", "cis-ubuntu-linux-2204-l1", "cis-ubuntu2204-l1",
                      "1.0.14").plan.product == "cis-ubuntu-linux-2204-l1"
    assert "12-gen2" in [s.name for s in images.list_skus(LOCATION, "Debian", "debian-12")]
    with pytest.raises(ResourceNotFoundError):
        images.list(LOCATION, "Debian", "debian-12", "13")


# -- disks, blobs and Azurite --------------------------------------------------------------------


def test_disk_access_gives_a_sas_url_with_the_disk_bytes(arm, arm_double, ssh_key, azurite):
    arm.resources.resource_groups.create_or_update("rg", {"location": LOCATION})
    vm, _, _ = linux_vm(arm, "rg", ssh_key)
    disk_name = vm["properties"]["storageProfile"]["osDisk"]["name"]
    with pytest.raises(HttpResponseError) as running:
        arm.compute.disks.begin_grant_access("rg", disk_name, {"access": "Read", "durationInSeconds": 3600})
    assert error_code(running) == "OperationNotAllowed"
    arm.compute.virtual_machines.begin_deallocate("rg", vm["name"]).result()
    assert arm.compute.disks.get("rg", disk_name).disk_state == "Reserved"
    sas = arm.compute.disks.begin_grant_access("rg", disk_name, {"access": "Read", "durationInSeconds": 3600})
    url = sas.result().access_sas
    assert url.startswith(azurite.blob_endpoint + "/") and "sig=" in url
    assert arm.compute.disks.get("rg", disk_name).disk_state == "ActiveSAS"
    data = BlobClient.from_blob_url(url).download_blob().readall()
    assert data[-512:-504] == b"conectix" and disk_name.encode() in data[:200]

    # A server-side copy into a storage account created through ARM really copies the bytes.
    account = arm.storage.storage_accounts.begin_create("rg", "gsvhd1", {
        "location": LOCATION, "kind": "StorageV2", "sku": {"name": "Standard_LRS"}}).result()
    key = arm.storage.storage_accounts.list_keys("rg", "gsvhd1").as_dict()["keys"][0]["value"]
    service = BlobServiceClient(account.primary_endpoints.blob, credential=key)
    service.create_container("vhds")
    target = service.get_blob_client("vhds", "golden.vhd")
    target.start_copy_from_url(url)
    deadline = time.monotonic() + 10
    while target.get_blob_properties().copy.status == "pending" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert target.download_blob().readall() == data

    with pytest.raises(HttpResponseError) as exporting:
        arm.compute.disks.begin_delete("rg", disk_name).result()
    assert error_code(exporting) == "OperationNotAllowed"
    arm.compute.disks.begin_revoke_access("rg", disk_name).result()
    with pytest.raises(ResourceNotFoundError):
        BlobClient.from_blob_url(url).download_blob()  # revoked: the SAS URL no longer works
    arm.storage.storage_accounts.delete("rg", "gsvhd1")
    assert "vhds" not in [c.name for c in service.list_containers()]
    arm.resources.resource_groups.begin_delete("rg").result()


def test_images_and_versions_from_a_vhd_blob(arm, arm_double, azurite):
    arm.resources.resource_groups.create_or_update("rg", {"location": LOCATION})
    container = azurite.service().get_container_client("uploads")
    container.create_container()
    vhd = fixed_vhd(b"locally built image\n")
    page = container.get_blob_client("golden.vhd")
    page.create_page_blob(len(vhd))
    page.upload_page(vhd[:1024 * 1024], offset=0, length=1024 * 1024)
    page.upload_page(vhd[-512:], offset=len(vhd) - 512, length=512)
    container.upload_blob("block.vhd", vhd)
    try:
        def image(uri: str):
            return arm.compute.images.begin_create_or_update("rg", "img", {"location": LOCATION, "properties": {
                "storageProfile": {"osDisk": {"osType": "Linux", "osState": "Generalized", "blobUri": uri}}}})

        with pytest.raises(HttpResponseError, match="page blob"):
            image(container.url + "/block.vhd")
        with pytest.raises(HttpResponseError, match="does not exist"):
            image(container.url + "/missing.vhd")
        assert image(page.url).result().storage_profile.os_disk.blob_uri == page.url

        # The bytes follow: gallery version from the blob -> VM -> disk export gives the same VHD.
        arm.compute.galleries.begin_create_or_update("rg", "g", {"location": LOCATION}).result()
        arm.compute.gallery_images.begin_create_or_update("rg", "g", "def", {
            "location": LOCATION, "properties": {"osType": "Linux", "osState": "Generalized",
                                                 "identifier": {"publisher": "p", "offer": "o", "sku": "s"}}}).result()
        version = arm.compute.gallery_image_versions.begin_create_or_update("rg", "g", "def", "1.0.0", {
            "location": LOCATION, "properties": {"storageProfile": {"osDiskImage": {"source": {
                "uri": page.url, "storageAccountId": f"/subscriptions/{arm_double.subscription_id}/resourceGroups/rg"
                                                     "/providers/Microsoft.Storage/storageAccounts/uploads"}}}}})
        disk = arm.compute.disks.begin_create_or_update("rg", "d", {"location": LOCATION, "properties": {
            "creationData": {"createOption": "Copy", "sourceResourceId": version.result().id}}}).result()
        sas = arm.compute.disks.begin_grant_access("rg", "d", {"access": "Read", "durationInSeconds": 60}).result()
        assert BlobClient.from_blob_url(sas.access_sas).download_blob().readall() == vhd
        assert disk.disk_state == "Unattached"
        arm.compute.disks.begin_revoke_access("rg", "d").result()
        arm.resources.resource_groups.begin_delete("rg").result()
    finally:
        container.delete_container()


# -- Run Command ---------------------------------------------------------------------------------


def test_windows_run_commands_are_recorded_and_answered(arm, arm_double):
    arm.resources.resource_groups.create_or_update("rg", {"location": LOCATION})
    nic, _ = network_for_vm(arm, "rg", public_ip=False)
    vm = arm.compute.virtual_machines.begin_create_or_update("rg", "win", {"location": LOCATION, "properties": {
        "hardwareProfile": {"vmSize": "Standard_D2s_v3"}, "storageProfile": {"imageReference": WINDOWS},
        "osProfile": {"computerName": "win", "adminUsername": "packer", "adminPassword": "Pa55w.rd-Pa55w.rd"},
        "networkProfile": {"networkInterfaces": [{"id": nic["id"]}]}}}).result()
    arm_double.windows_run_command = lambda vm, command_id, script, parameters: (f"ran on {vm}: {script}", "warn")
    result = arm.compute.virtual_machines.begin_run_command("rg", "win", {
        "commandId": "RunPowerShellScript", "script": ["Write-Output hi"]}).result()
    assert [(s.code, s.message) for s in result.value] == [
        ("ComponentStatus/StdOut/succeeded", "ran on win: Write-Output hi"), ("ComponentStatus/StdErr/succeeded", "warn")]
    assert arm_double.vm_guest(vm.id) is None  # no sshd for Windows
    assert arm_double.run_commands == [{"vm": vm.id, "commandId": "RunPowerShellScript",
                                        "script": ["Write-Output hi"], "parameters": []}]
    assert arm.compute.virtual_machines.get("rg", "win").os_profile.admin_password is None
    arm.resources.resource_groups.begin_delete("rg").result()


def test_linux_run_command_failure_and_managed_run_commands(arm, arm_double, ssh_key):
    arm.resources.resource_groups.create_or_update("rg", {"location": LOCATION})
    linux_vm(arm, "rg", ssh_key)
    failed = arm.compute.virtual_machines.begin_run_command("rg", "vm", {
        "commandId": "RunShellScript", "script": ["echo partial", "exit 3"]}).result()
    assert failed.value[0].code == "ProvisioningState/failed/3"
    assert "exit status=3" in failed.value[0].message and "partial" in failed.value[0].message

    command = arm.compute.virtual_machine_run_commands.begin_create_or_update("rg", "vm", "hello", {
        "location": LOCATION, "properties": {"source": {"script": "echo $WHO; id -u"},
                                             "parameters": [{"name": "WHO", "value": "world"}]}}).result()
    assert command.provisioning_state == "Succeeded"
    view = arm.compute.virtual_machine_run_commands.get_by_virtual_machine("rg", "vm", "hello",
                                                                            expand="instanceView").instance_view
    assert (view.execution_state, view.exit_code, view.output) == ("Succeeded", 0, "world\n0\n")
    arm.compute.virtual_machine_run_commands.begin_delete("rg", "vm", "hello").result()
    arm.resources.resource_groups.begin_delete("rg").result()


def test_powering_off_kills_everything_in_the_vm(arm, arm_double, ssh_key):
    arm.resources.resource_groups.create_or_update("rg", {"location": LOCATION})
    _, _, pip = linux_vm(arm, "rg", ssh_key)
    with ssh(pip["properties"]["ipAddress"], ssh_key) as comm:
        code, lines = run(comm, "setsid nohup sleep 1000 >/dev/null 2>&1 < /dev/null & echo $!")
    daemon = int(lines[-1])
    script = arm.compute.virtual_machines.begin_run_command("rg", "vm", {"commandId": "RunShellScript",
                                                                        "script": ["sleep 1000"]})
    assert is_running(daemon) and not script.done()
    arm.compute.virtual_machines.begin_deallocate("rg", "vm").result()
    assert not is_running(daemon)
    assert script.result().value[0].code == "ProvisioningState/failed/-9"
    arm.resources.resource_groups.begin_delete("rg").result()


# -- faults --------------------------------------------------------------------------------------


def test_throttling_is_retried_after_retry_after(arm, arm_double):
    arm.resources.resource_groups.create_or_update("rg", {"location": LOCATION})
    fault = arm_double.inject("throttle", "GET", r"/resourcegroups/rg$", retry_after=1)
    started = time.monotonic()
    assert arm.resources.resource_groups.get("rg").name == "rg"
    assert time.monotonic() - started >= 1
    assert fault.hits == 1
    assert statuses(arm_double, "GET", "/resourcegroups/rg") == [429, 200]
    arm.resources.resource_groups.begin_delete("rg").result()


def test_server_errors_are_retried_then_raised(arm, arm_double, azure_credentials):
    arm_double.inject("error", "PUT", r"/resourcegroups/rg$", times=2)
    assert arm.resources.resource_groups.create_or_update("rg", {"location": LOCATION}).name == "rg"
    assert statuses(arm_double, "PUT", "/resourcegroups/rg") == [500, 500, 201]
    arm_double.inject("error", "GET", r"/resourcegroups/rg$", times=100, status=503, code="ServiceUnavailable")
    with pytest.raises(HttpResponseError) as e:
        Clients(azure_credentials, retry_total=2).resources.resource_groups.get("rg")
    assert (e.value.status_code, error_code(e)) == (503, "ServiceUnavailable")
    arm_double.faults.clear()
    arm.resources.resource_groups.begin_delete("rg").result()


def test_conflict_is_not_retried(arm, arm_double):
    arm.resources.resource_groups.create_or_update("rg", {"location": LOCATION})
    arm_double.inject("conflict", "PUT", r"/publicIPAddresses/pip$", code="AnotherOperationInProgress")
    with pytest.raises(HttpResponseError) as e:
        arm.network.public_ip_addresses.begin_create_or_update("rg", "pip", {"location": LOCATION})
    assert (e.value.status_code, error_code(e)) == (409, "AnotherOperationInProgress")
    assert arm.network.public_ip_addresses.begin_create_or_update("rg", "pip", {"location": LOCATION}).result()
    arm.resources.resource_groups.begin_delete("rg").result()


def test_an_operation_that_ends_failed(arm, arm_double, ssh_key):
    arm.resources.resource_groups.create_or_update("rg", {"location": LOCATION})
    nic, _ = network_for_vm(arm, "rg", public_ip=False)
    arm_double.inject("lro_failed", "PUT", r"/virtualMachines/vm$", code="AllocationFailed",
                      message="Allocation failed. We do not have sufficient capacity for the requested VM size.")
    poller = arm.compute.virtual_machines.begin_create_or_update("rg", "vm", linux_vm_body(nic["id"], ssh_key))
    with pytest.raises(HttpResponseError) as e:
        poller.result()
    assert error_code(e) == "AllocationFailed"
    vm = arm.compute.virtual_machines.get("rg", "vm")  # as on Azure, the failed VM stays until deleted
    assert vm.provisioning_state == "Failed" and arm_double.vm_guest(vm.id) is None
    arm.resources.resource_groups.begin_delete("rg").result()


def test_dropped_connections(arm, arm_double, azure_credentials):
    arm.resources.resource_groups.create_or_update("rg", {"location": LOCATION})
    arm_double.inject("drop", "GET", r"/resourcegroups/rg$")
    assert arm.resources.resource_groups.get("rg").name == "rg"  # azure-core retries the GET
    assert statuses(arm_double, "GET", "/resourcegroups/rg") == [None, 200]

    # The response is lost after ARM acted: the client sees an error, the group exists anyway.
    arm_double.inject("drop_after", "PUT", r"/resourcegroups/lost$", times=100)
    with pytest.raises((ServiceResponseError, ServiceRequestError)):
        Clients(azure_credentials, retry_total=1).resources.resource_groups.create_or_update("lost", {"location": LOCATION})
    assert arm.resources.resource_groups.check_existence("lost")
    arm_double.faults.clear()
    for group in ("rg", "lost"):
        arm.resources.resource_groups.begin_delete(group).result()


def test_slow_responses_and_latencies(arm, arm_double):
    arm_double.inject("slow", "PUT", r"/resourcegroups/rg$", delay=0.5)
    started = time.monotonic()
    arm.resources.resource_groups.create_or_update("rg", {"location": LOCATION})
    assert time.monotonic() - started >= 0.5
    arm_double.set_latency("publicIPAddresses/create", polls=3)
    arm.network.public_ip_addresses.begin_create_or_update("rg", "pip", {"location": LOCATION}).result()
    polls = [c for c in arm_double.calls if "/providers/Microsoft.Network/locations/" in c.path]
    assert len(polls) == 3
    arm.resources.resource_groups.begin_delete("rg").result()


# -- aio clients ---------------------------------------------------------------------------------


def test_aio_clients(azure_credentials, arm_double, ssh_key):
    from azure.mgmt.compute.aio import ComputeManagementClient as AioCompute
    from azure.mgmt.network.aio import NetworkManagementClient as AioNetwork
    from azure.mgmt.resource.resources.aio import ResourceManagementClient as AioResources

    c = azure_credentials

    async def main():
        async with c.async_credential() as credential, \
                AioResources(credential, c.subscription_id, **c.client_kwargs()) as resources, \
                AioNetwork(credential, c.subscription_id, **c.client_kwargs()) as network, \
                AioCompute(credential, c.subscription_id, **c.client_kwargs()) as compute:
            await resources.resource_groups.create_or_update("rg", {"location": LOCATION})
            arm_double.inject("throttle", "GET", r"/resourcegroups/rg$", retry_after=0.2)
            assert (await resources.resource_groups.get("rg")).name == "rg"
            vnet = await (await network.virtual_networks.begin_create_or_update("rg", "vnet", {
                "location": LOCATION, "properties": {"addressSpace": {"addressPrefixes": ["10.0.0.0/16"]}, "subnets": [
                    {"name": "s", "properties": {"addressPrefix": "10.0.0.0/24"}}]}})).result()
            nic = await (await network.network_interfaces.begin_create_or_update("rg", "nic", {
                "location": LOCATION, "properties": {"ipConfigurations": [
                    {"name": "ip", "properties": {"subnet": {"id": vnet.subnets[0].id}}}]}})).result()
            vm = await (await compute.virtual_machines.begin_create_or_update(
                "rg", "vm", linux_vm_body(nic.id, ssh_key))).result()
            result = await (await compute.virtual_machines.begin_run_command(
                "rg", "vm", {"commandId": "RunShellScript", "script": ["hostname >/dev/null && echo ok"]})).result()
            await (await resources.resource_groups.begin_delete("rg")).result()
            return vm, result

    vm, result = asyncio.run(main())
    assert vm.provisioning_state == "Succeeded"
    assert "[stdout]\nok\n" in result.value[0].message
    assert arm_double.resources() == []


# -- the double itself ---------------------------------------------------------------------------


def test_seeded_and_kept_resources_are_not_leftovers(arm, arm_double):
    group = f"/subscriptions/{arm_double.subscription_id}/resourceGroups/images"
    arm_double.seed(group, {"location": LOCATION})
    gallery = arm_double.seed(f"{group}/providers/Microsoft.Compute/galleries/g", {"location": LOCATION})
    assert gallery["properties"]["provisioningState"] == "Succeeded"
    arm_double.seed(f"{group}/providers/Microsoft.Network/virtualNetworks/corp", {"location": LOCATION, "properties": {
        "addressSpace": {"addressPrefixes": ["10.1.0.0/16"]},
        "subnets": [{"name": "builds", "properties": {"addressPrefix": "10.1.0.0/24"}}]}})
    assert f"{group}/providers/Microsoft.Network/virtualNetworks/corp/subnets/builds" in arm_double.resources()
    arm.network.public_ip_addresses.begin_create_or_update("images", "pip", {"location": LOCATION}).result()
    assert arm_double.leftovers() == [f"{group}/providers/Microsoft.Network/publicIPAddresses/pip"]
    arm_double.keep(f"{group}/providers/Microsoft.Network/publicIPAddresses/pip")
    assert arm_double.leftovers() == []


def test_stopping_the_double_stops_every_guest(ssh_key, azurite):
    with ArmDouble(blob_store=azurite) as double:
        group = f"/subscriptions/{double.subscription_id}/resourceGroups/rg"
        double.seed(group, {"location": LOCATION})
        double.seed(f"{group}/providers/Microsoft.Network/virtualNetworks/vnet", {"location": LOCATION, "properties": {
            "addressSpace": {"addressPrefixes": ["10.0.0.0/16"]},
            "subnets": [{"name": "s", "properties": {"addressPrefix": "10.0.0.0/24"}}]}})
        nic = double.seed(f"{group}/providers/Microsoft.Network/networkInterfaces/nic", {
            "location": LOCATION, "properties": {"ipConfigurations": [{"name": "ip", "properties": {
                "subnet": {"id": f"{group}/providers/Microsoft.Network/virtualNetworks/vnet/subnets/s"}}}]}})
        vm = double.seed(f"{group}/providers/Microsoft.Compute/virtualMachines/vm", linux_vm_body(nic["id"], ssh_key))
        guest = double.vm_guest(vm["id"])
        address, pid, directory = guest.addresses[0], guest.pid, double.directory
        assert is_running(pid) and listening(address)
    assert not is_running(pid) and not listening(address) and not directory.exists()

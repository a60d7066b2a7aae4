"""The ARM test double, proven with the real azure-identity and azure-mgmt-* clients (sync and aio)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.network import NetworkManagementClient
from azure.mgmt.resource.resources import ResourceManagementClient

LOCATION = "westus2"


@pytest.fixture
def clients(azure_credentials):
    c = azure_credentials
    credential = c.credential()
    kwargs = c.client_kwargs()
    yield (ResourceManagementClient(credential, c.subscription_id, **kwargs),
           NetworkManagementClient(credential, c.subscription_id, **kwargs),
           ComputeManagementClient(credential, c.subscription_id, **kwargs))


@pytest.fixture(scope="module")
def ssh_key(tmp_path_factory) -> Path:
    key = tmp_path_factory.mktemp("ssh") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    return key


def test_smoke(clients, ssh_key, arm_double):
    resource, network, compute = clients
    rg = resource.resource_groups.create_or_update("rg1", {"location": LOCATION, "tags": {"a": "b"}})
    assert rg.properties.provisioning_state == "Succeeded"
    vnet = network.virtual_networks.begin_create_or_update("rg1", "vnet", {
        "location": LOCATION, "properties": {"addressSpace": {"addressPrefixes": ["10.0.0.0/16"]},
                                             "subnets": [{"name": "default", "properties": {"addressPrefix": "10.0.0.0/24"}}]}}).result()
    pip = network.public_ip_addresses.begin_create_or_update("rg1", "pip", {"location": LOCATION}).result()
    nic = network.network_interfaces.begin_create_or_update("rg1", "nic", {
        "location": LOCATION, "properties": {"ipConfigurations": [{"name": "ipconfig", "properties": {
            "subnet": {"id": vnet.subnets[0].id}, "publicIPAddress": {"id": pip.id}}}]}}).result()
    vm = compute.virtual_machines.begin_create_or_update("rg1", "vm", {
        "location": LOCATION, "properties": {
            "hardwareProfile": {"vmSize": "Standard_D1_v2"},
            "storageProfile": {"imageReference": {"publisher": "Debian", "offer": "debian-12", "sku": "12",
                                                  "version": "latest"}},
            "osProfile": {"computerName": "vm", "adminUsername": "packer", "linuxConfiguration": {
                "disablePasswordAuthentication": True,
                "ssh": {"publicKeys": [{"path": "/home/packer/.ssh/authorized_keys",
                                        "keyData": Path(f"{ssh_key}.pub").read_text().strip()}]}}},
            "networkProfile": {"networkInterfaces": [{"id": nic.id}]}}}).result()
    print(vm.as_dict())
    ip = network.public_ip_addresses.get("rg1", "pip").ip_address
    out = subprocess.run(["ssh", "-i", ssh_key, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                          f"packer@{ip}", "id -un"], capture_output=True, text=True)
    assert out.stdout == "packer\n", out.stderr
    resource.resource_groups.begin_delete("rg1").result()
    assert arm_double.resources() == []

"""Fixtures for the Azure backend's tests: the ARM test double (armdouble/), Azurite, and credentials
and an Airflow connection that point the real azure-identity / azure-mgmt-* clients at them.

    def test_something(arm_double, azure_credentials):
        client = ResourceManagementClient(azure_credentials.credential(), azure_credentials.subscription_id,
                                          **azure_credentials.client_kwargs())
        ...
        assert arm_double.leftovers() == []  # also checked after every test

This directory has no __init__.py on purpose: as a package it would be named `azure` and shadow the
Azure SDK. Test modules here are imported by basename, so each needs a name unique in tests/, and
none may be named like an Azure SDK package (core, identity, mgmt, storage): tests/ is on sys.path and
`azure` is a namespace package. What the double implements: armdouble/README.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

import pytest
from armdouble import ArmDouble, Azurite, running_azurite
from armdouble.vmhost import supported as vm_guests_supported
from sshd_fixture import is_running

# Azure's default; the double accepts any scope, so clients need not change it.
ARM_SCOPES = ["https://management.azure.com/.default"]


def pytest_configure(config):
    config.addinivalue_line("markers", "arm_leftovers_ok: the test may leave resources behind in the ARM double")


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    """Azurite's blob service on a free port; `.account_name`, `.account_key`, `.blob_endpoint`,
    `.connection_string`, `.service()` (a BlobServiceClient)."""
    try:
        with running_azurite() as instance:
            yield instance
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def arm_double_server(azurite) -> Iterator[ArmDouble]:
    """The one double of the session (use `arm_double`, which resets it around each test)."""
    with ArmDouble(blob_store=azurite) as double:
        yield double


@pytest.fixture
def arm_double(arm_double_server, request) -> Iterator[ArmDouble]:
    """The ARM test double, empty at the start of the test. After the test it must hold nothing the
    test created (see `ArmDouble.seed` and `.keep`, or mark the test `arm_leftovers_ok`) and must
    not have hit a bug of its own (`internal_errors`); then it is reset (VMs powered off)."""
    double = arm_double_server
    double.reset()
    if reason := vm_guests_supported():
        pytest.skip(reason)
    yield double
    internal_errors, leftovers = list(double.internal_errors), double.leftovers()
    guest_pids = [guest.pid for guest in double.guests() if guest.pid]
    double.reset()
    assert not [pid for pid in guest_pids if is_running(pid)], "VM sshds survived the reset"
    assert not any((double.directory / "vms").glob("*")), "VM disks survived the reset"
    assert not internal_errors, "the ARM double failed:\n" + "\n".join(internal_errors)
    if not request.node.get_closest_marker("arm_leftovers_ok"):
        assert leftovers == [], f"resources left behind in the ARM double: {leftovers}"


@dataclass(frozen=True)
class AzureCredentials:
    """A service principal the double accepts, and where its endpoints are.

    - `authority`: azure-identity's `authority=`, with `disable_instance_discovery=True` (else MSAL
      asks login.microsoftonline.com to validate the authority).
    - `resource_manager`: the azure-mgmt clients' `base_url=`.
    - `ca_bundle`: the double's CA; pass it as `connection_verify=` to credentials and clients (sync
      and aio: aiohttp ignores REQUESTS_CA_BUNDLE).
    """

    tenant_id: str
    client_id: str
    client_secret: str
    subscription_id: str
    authority: str
    resource_manager: str
    ca_bundle: str
    federated_token: str  # what ClientAssertionCredential's callback must return

    def credential(self):
        from azure.identity import ClientSecretCredential
        return ClientSecretCredential(self.tenant_id, self.client_id, self.client_secret, authority=self.authority,
                                      disable_instance_discovery=True, connection_verify=self.ca_bundle)

    def async_credential(self):
        from azure.identity.aio import ClientSecretCredential
        return ClientSecretCredential(self.tenant_id, self.client_id, self.client_secret, authority=self.authority,
                                      disable_instance_discovery=True, connection_verify=self.ca_bundle)

    def client_kwargs(self) -> dict:
        """What an azure-mgmt-* client (sync or aio) needs besides credential and subscription id."""
        return {"base_url": self.resource_manager, "credential_scopes": ARM_SCOPES,
                "connection_verify": self.ca_bundle}


@pytest.fixture
def azure_credentials(arm_double) -> AzureCredentials:
    return AzureCredentials(arm_double.tenant_id, arm_double.client_id, arm_double.client_secret,
                            arm_double.subscription_id, arm_double.authority, arm_double.endpoint,
                            str(arm_double.ca_path), arm_double.federated_token)


@pytest.fixture
def managed_identity_env(arm_double, monkeypatch) -> dict[str, str]:
    """IDENTITY_ENDPOINT and IDENTITY_HEADER (App Service's managed identity protocol) set to the double:
    ManagedIdentityCredential / DefaultAzureCredential get tokens from it (pass connection_verify)."""
    env = {"IDENTITY_ENDPOINT": f"{arm_double.endpoint}/msi/token", "IDENTITY_HEADER": arm_double.identity_header}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def workload_identity_env(arm_double, monkeypatch, tmp_path) -> dict[str, str]:
    """AZURE_TENANT_ID, AZURE_CLIENT_ID, AZURE_FEDERATED_TOKEN_FILE and AZURE_AUTHORITY_HOST set as AKS
    workload identity sets them, for the double: WorkloadIdentityCredential gets tokens from it (pass
    disable_instance_discovery=True and connection_verify)."""
    token_file = tmp_path / "federated-token"
    token_file.write_text(arm_double.federated_token)
    env = {"AZURE_TENANT_ID": arm_double.tenant_id, "AZURE_CLIENT_ID": arm_double.client_id,
           "AZURE_FEDERATED_TOKEN_FILE": str(token_file), "AZURE_AUTHORITY_HOST": arm_double.authority}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@dataclass(frozen=True)
class AzureConnection:
    """An Airflow connection of the provider's `azure` type for the double, already set in the
    environment (AIRFLOW_CONN_<CONN_ID>). login/password/tenantId/subscriptionId are the provider's
    own fields; `authority`, `resource_manager_endpoint` and `connection_verify` are Goldsmith's
    extras for clouds the provider's `cloud_environment` names don't cover (the double here)."""

    conn_id: str
    json: str
    uri: str


@pytest.fixture
def azure_connection(azure_credentials, monkeypatch) -> AzureConnection:
    c = azure_credentials
    extra = {"tenantId": c.tenant_id, "subscriptionId": c.subscription_id, "authority": c.authority,
             "resource_manager_endpoint": c.resource_manager, "connection_verify": c.ca_bundle}
    conn_id = "azure_default"
    as_json = json.dumps({"conn_type": "azure", "login": c.client_id, "password": c.client_secret, "extra": extra})
    uri = (f"azure://{quote(c.client_id, safe='')}:{quote(c.client_secret, safe='')}@?"
           + "&".join(f"{k}={quote(v, safe='')}" for k, v in extra.items()))
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", as_json)
    return AzureConnection(conn_id, as_json, uri)

"""The build's identity: the hook makes modern azure-identity credentials from the Airflow connection (service
principal, managed identity, workload identity), points the sync and aio clients at the connection's ARM
endpoint, authority and CA, and keeps the secret out of logs."""

from __future__ import annotations

import asyncio
import json

import pytest
from airflow.providers.microsoft.azure.hooks.base_azure import AzureBaseHook
from azure.identity import ClientSecretCredential, DefaultAzureCredential
from azure.mgmt.network import NetworkManagementClient

from goldsmith.azure.hooks import AzureBuildHook, AzureSettingsError


def set_connection(monkeypatch, conn: dict, conn_id: str = "azure_default") -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))


def endpoints(azure_credentials) -> dict[str, str]:
    c = azure_credentials
    return {"subscriptionId": c.subscription_id, "authority": c.authority,
            "resource_manager_endpoint": c.resource_manager, "connection_verify": c.ca_bundle}


def list_groups_sync_and_aio(conn_id: str = "azure_default") -> tuple[list, list]:
    hook = AzureBuildHook(conn_id)
    sync = [g.as_dict()["name"] for g in hook.clients().resources.resource_groups.list()]

    async def aio() -> list:
        async with AzureBuildHook.async_clients(conn_id) as (_, clients):
            return [g.as_dict()["name"] async for g in clients.resources.resource_groups.list()]

    return sync, asyncio.run(aio())


def test_service_principal(azure_connection, arm_double):
    arm_double.seed(f"/subscriptions/{arm_double.subscription_id}/resourceGroups/rg1", {"location": "westus2"})
    hook = AzureBuildHook()
    assert isinstance(hook.get_credential(), ClientSecretCredential)
    assert list_groups_sync_and_aio() == (["rg1"], ["rg1"])


def test_managed_identity(azure_credentials, arm_double, managed_identity_env, monkeypatch):
    set_connection(monkeypatch, {"conn_type": "azure", "extra": endpoints(azure_credentials)})
    assert isinstance(AzureBuildHook().get_credential(), DefaultAzureCredential)
    assert list_groups_sync_and_aio() == ([], [])


def test_workload_identity(azure_credentials, arm_double, workload_identity_env, monkeypatch):
    set_connection(monkeypatch, {"conn_type": "azure", "extra": {
        **endpoints(azure_credentials), "workload_identity_tenant_id": azure_credentials.tenant_id}})
    assert list_groups_sync_and_aio() == ([], [])


def test_the_secret_is_masked(azure_connection):
    from airflow.sdk._shared.secrets_masker.secrets_masker import redact

    secret = json.loads(azure_connection.json)["password"]
    AzureBuildHook().settings  # reading the connection registers its password with the masker
    assert secret not in str(redact(f"token request with {secret}"))
    assert secret not in repr(AzureBuildHook().settings)


@pytest.mark.parametrize("extra, error", [
    ({}, "extra 'subscriptionId' is missing"),
    ({"subscriptionId": "s", "cloud_environment": "Mars"}, "extra 'cloud_environment' is 'Mars'; use one of"),
    ({"subscriptionId": "s", "goldsmith_poll_interval": "soon"}, "extra 'goldsmith_poll_interval' must be a number"),
])
def test_a_connection_missing_what_the_backend_needs_is_a_clear_error(monkeypatch, extra, error):
    set_connection(monkeypatch, {"conn_type": "azure", "extra": extra}, "broken")
    with pytest.raises(AzureSettingsError, match=f"Airflow connection 'broken': {error}"):
        AzureBuildHook("broken").settings


def test_why_the_provider_base_hook_is_not_used_for_clients(azure_connection, monkeypatch):
    """Without `use_azure_identity_object` AzureBaseHook builds a legacy ServicePrincipalCredentials, which asks
    login.microsoftonline.com for a token as it is made; with it, get_conn passes `credentials=` to SDK clients
    that take `credential=`."""
    conn = json.loads(azure_connection.json)
    conn["extra"]["use_azure_identity_object"] = True
    set_connection(monkeypatch, conn)
    with pytest.raises(TypeError, match="missing 1 required positional argument: .credential."):
        AzureBaseHook(sdk_client=NetworkManagementClient).get_conn()

"""Azure clients for a build, made from the Airflow connection that is the build's identity.

The hook subclasses the provider's `AzureBaseHook` the way the provider's `AzureComputeHook` does: modern
azure-identity credentials (never the legacy `ServicePrincipalCredentials` the base class builds without
`use_azure_identity_object`, nor `AzureBaseHook.get_conn`, which passes `credentials=` to SDK clients that
take `credential=`). Secrets come only from the connection (its password is masked in logs by Airflow).

Connection (type `azure`):
- service principal: login = client id, password = client secret, extra `tenantId`;
- otherwise DefaultAzureCredential: managed identity (extra `managed_identity_client_id`), workload identity
  (extra `workload_identity_tenant_id`), environment variables, ...;
- extra `subscriptionId` (required): where staging resources go;
- extra `cloud_environment` (AzurePublicCloud, AzureUSGovernment, AzureChinaCloud), or for another ARM
  endpoint (Azure Stack Hub, a test double) `resource_manager_endpoint`, `authority` and optionally
  `credential_scope`;
- extra `connection_verify`: a CA bundle for both ARM and token endpoints (default: `REQUESTS_CA_BUNDLE`,
  then the system store);
- goldsmith's own: `goldsmith_ssh_source` (CIDR allowed to reach build VMs on SSH; default `auto`, the
  worker's egress address), `goldsmith_poll_interval` (seconds between status checks; default 15).
"""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any, AsyncIterator, Mapping

from airflow.providers.common.compat.connection import get_async_connection, get_async_extra_dejson
from airflow.providers.microsoft.azure.hooks.base_azure import AzureBaseHook
from azure.core.credentials import TokenCredential
from azure.identity import AzureAuthorityHosts, ClientSecretCredential, DefaultAzureCredential
from azure.identity.aio import ClientSecretCredential as AsyncClientSecretCredential
from azure.identity.aio import DefaultAzureCredential as AsyncDefaultAzureCredential
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.compute.aio import ComputeManagementClient as AsyncComputeManagementClient
from azure.mgmt.network import NetworkManagementClient
from azure.mgmt.network.aio import NetworkManagementClient as AsyncNetworkManagementClient
from azure.mgmt.resource.resources import ResourceManagementClient
from azure.mgmt.resource.resources.aio import ResourceManagementClient as AsyncResourceManagementClient
from azure.mgmt.storage import StorageManagementClient
from azure.mgmt.storage.aio import StorageManagementClient as AsyncStorageManagementClient

_CLOUDS = {
    "AzurePublicCloud": ("https://management.azure.com", AzureAuthorityHosts.AZURE_PUBLIC_CLOUD),
    "AzureUSGovernment": ("https://management.usgovcloudapi.net", AzureAuthorityHosts.AZURE_GOVERNMENT),
    "AzureChinaCloud": ("https://management.chinacloudapi.cn", AzureAuthorityHosts.AZURE_CHINA),
}

# ARM throttles with 429 + Retry-After (honoured by azure-core whatever the count) and has transient 5xx:
# retry those a few times with exponential backoff capped at a minute; the task's own retries come after.
RETRY = {"retry_total": 8, "retry_connect": 4, "retry_read": 3, "retry_status": 6,
         "retry_backoff_factor": 1.0, "retry_backoff_max": 60}

# azure-core logs every request and response at INFO: in a task log that buries the build's own lines.
logging.getLogger("azure.core.pipeline.policies.http_logging_policy").setLevel(logging.WARNING)


class AzureSettingsError(ValueError):
    """The Airflow connection lacks something the azure backend needs; the message names the field."""


@dataclass(frozen=True)
class ArmSettings:
    """What a client needs from the connection, secrets excluded from repr."""

    conn_id: str
    subscription_id: str
    base_url: str
    authority: str
    credential_scope: str
    connection_verify: str | bool
    tenant_id: str | None
    client_id: str | None
    client_secret: str | None
    managed_identity_client_id: str | None
    workload_identity_tenant_id: str | None
    ssh_source: str
    poll_interval: float

    def __repr__(self) -> str:
        return f"ArmSettings({self.conn_id!r}, subscription {self.subscription_id}, {self.base_url})"

    @classmethod
    def from_connection(cls, conn: Any, extra: Mapping[str, Any]) -> ArmSettings:
        def get(name: str) -> Any:
            value = extra.get(name)
            return value if value not in ("", None) else None

        subscription = get("subscriptionId")
        if not subscription:
            raise AzureSettingsError(
                f"Airflow connection '{conn.conn_id}': extra 'subscriptionId' is missing; set it to the "
                f"subscription where build resources are created")
        cloud = get("cloud_environment") or "AzurePublicCloud"
        if cloud not in _CLOUDS:
            raise AzureSettingsError(f"Airflow connection '{conn.conn_id}': extra 'cloud_environment' is "
                                     f"'{cloud}'; use one of {', '.join(_CLOUDS)} or set 'resource_manager_endpoint'")
        base_url = (get("resource_manager_endpoint") or _CLOUDS[cloud][0]).rstrip("/")
        authority = get("authority") or _CLOUDS[cloud][1]
        verify = get("connection_verify")
        if verify is None:
            verify = os.environ.get("REQUESTS_CA_BUNDLE") or True
        elif isinstance(verify, str) and verify.lower() in ("true", "false"):
            verify = verify.lower() == "true"
        try:
            poll_interval = float(get("goldsmith_poll_interval") or 15)
        except ValueError:
            raise AzureSettingsError(f"Airflow connection '{conn.conn_id}': extra 'goldsmith_poll_interval' "
                                     "must be a number of seconds") from None
        return cls(
            conn_id=conn.conn_id, subscription_id=subscription, base_url=base_url, authority=authority,
            credential_scope=get("credential_scope") or f"{base_url}/.default", connection_verify=verify,
            tenant_id=get("tenantId"), client_id=conn.login or None, client_secret=conn.password or None,
            managed_identity_client_id=get("managed_identity_client_id"),
            workload_identity_tenant_id=get("workload_identity_tenant_id"),
            ssh_source=get("goldsmith_ssh_source") or "auto", poll_interval=poll_interval,
        )

    @property
    def transport_options(self) -> dict[str, Any]:
        return {"connection_verify": self.connection_verify}

    def credential(self, *, aio: bool = False) -> Any:
        custom_authority = self.authority not in {a for _, a in _CLOUDS.values()}
        options = {"authority": self.authority, **self.transport_options, **RETRY}
        if custom_authority:  # instance discovery asks login.microsoftonline.com about the authority
            options["disable_instance_discovery"] = True
        if self.client_id and self.client_secret and self.tenant_id:
            cls = AsyncClientSecretCredential if aio else ClientSecretCredential
            return cls(tenant_id=self.tenant_id, client_id=self.client_id, client_secret=self.client_secret,
                       **options)
        cls = AsyncDefaultAzureCredential if aio else DefaultAzureCredential
        if self.managed_identity_client_id:
            options["managed_identity_client_id"] = self.managed_identity_client_id
        if self.workload_identity_tenant_id:  # as the provider's get_sync_default_azure_credential does
            options["workload_identity_tenant_id"] = self.workload_identity_tenant_id
            options["additionally_allowed_tenants"] = [self.workload_identity_tenant_id]
        return cls(**options)

    def client_options(self) -> dict[str, Any]:
        return {"base_url": self.base_url, "credential_scopes": [self.credential_scope], **self.transport_options,
                **RETRY}


@dataclass
class ArmClients:
    """The management clients of one subscription, sync or aio (same operation names on both)."""

    compute: Any
    network: Any
    resources: Any
    storage: Any

    def close_all(self) -> list[Any]:
        return [self.compute.close(), self.network.close(), self.resources.close(), self.storage.close()]


def _clients(settings: ArmSettings, credential: Any, subscription_id: str, *, aio: bool) -> ArmClients:
    kinds = (
        (AsyncComputeManagementClient, AsyncNetworkManagementClient, AsyncResourceManagementClient,
         AsyncStorageManagementClient)
        if aio else
        (ComputeManagementClient, NetworkManagementClient, ResourceManagementClient, StorageManagementClient)
    )
    return ArmClients(*(kind(credential=credential, subscription_id=subscription_id, **settings.client_options())
                        for kind in kinds))


class AzureBuildHook(AzureBaseHook):
    """The build's Azure identity and clients. `clients()` in tasks; `async_clients()` in triggers."""

    conn_name_attr = "azure_conn_id"
    default_conn_name = "azure_default"
    conn_type = "azure"
    hook_name = "Goldsmith Azure"

    def __init__(self, azure_conn_id: str = default_conn_name) -> None:
        # No sdk_client: AzureBaseHook.get_conn would call it with the legacy `credentials=` keyword.
        super().__init__(sdk_client=None, conn_id=azure_conn_id)
        self._clients: dict[str, ArmClients] = {}

    @cached_property
    def settings(self) -> ArmSettings:
        conn = self.get_connection(self.conn_id)
        return ArmSettings.from_connection(conn, conn.extra_dejson)

    def get_conn(self) -> ArmClients:
        return self.clients()

    @cached_property
    def credential(self) -> TokenCredential:
        return self.settings.credential()

    def get_credential(self, *, conn: Any = None) -> TokenCredential:
        return self.credential

    def clients(self, subscription_id: str | None = None) -> ArmClients:
        """Clients for `subscription_id` (sources and targets may live in another), default the connection's."""
        subscription_id = subscription_id or self.settings.subscription_id
        if subscription_id not in self._clients:
            self._clients[subscription_id] = _clients(self.settings, self.credential, subscription_id, aio=False)
        return self._clients[subscription_id]

    def blob_options(self) -> dict[str, Any]:
        """For azure-storage-blob clients, which keep their own retry policy."""
        return self.settings.transport_options

    def close(self) -> None:
        for clients in self._clients.values():
            clients.close_all()
        self._clients.clear()

    @classmethod
    @asynccontextmanager
    async def async_clients(cls, conn_id: str) -> AsyncIterator[tuple[ArmSettings, ArmClients]]:
        """aio clients for a trigger, made from the connection fetched without blocking the event loop."""
        conn = await get_async_connection(conn_id, cls)
        settings = ArmSettings.from_connection(conn, await get_async_extra_dejson(conn))
        credential = settings.credential(aio=True)
        clients = _clients(settings, credential, settings.subscription_id, aio=True)
        try:
            yield settings, clients
        finally:
            for closing in clients.close_all():
                await closing
            await credential.close()

"""ARM plumbing shared by the backend steps and the triggers: resource ids, typed GETs by id, starting a long
operation without waiting for it, and the waits a trigger polls until they are over.

Bodies and results are handled as the REST JSON (`.as_dict()` of the SDK models), so field names are spelled
as in the ARM REST spec and the AIB template.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterator

from azure.core.exceptions import HttpResponseError, ResourceNotFoundError, ServiceRequestError, ServiceResponseError
from azure.core.rest import HttpRequest

from goldsmith.azure.hooks import ArmClients
from goldsmith.core import BuildError


@dataclass(frozen=True)
class ResourceId:
    """`/subscriptions/{s}/resourceGroups/{rg}[/providers/{namespace}/{type}/{name}[/{type}/{name}]...]`."""

    subscription: str
    resource_group: str
    namespace: str | None = None
    types: tuple[str, ...] = ()
    names: tuple[str, ...] = ()

    @classmethod
    def parse(cls, resource_id: str, *, field: str = "resource id") -> ResourceId:
        parts = resource_id.strip("/").split("/")
        ok = (len(parts) >= 4 and parts[0].lower() == "subscriptions" and parts[2].lower() == "resourcegroups"
              and all(parts))
        if ok and len(parts) > 4:
            ok = len(parts) >= 8 and parts[4].lower() == "providers" and len(parts) % 2 == 0
        if not ok:
            raise ValueError(
                f"{field}: '{resource_id}' is not an ARM resource id; expected "
                "/subscriptions/<id>/resourceGroups/<group>/providers/<Namespace>/<type>/<name>")
        rest = parts[6:]
        return cls(parts[1], parts[3], parts[5] if len(parts) > 4 else None, tuple(rest[0::2]), tuple(rest[1::2]))

    @property
    def type(self) -> str:
        """e.g. `Microsoft.Compute/virtualMachines/runCommands`; `resourceGroups` for a group."""
        return "/".join((self.namespace, *self.types)) if self.namespace else "resourceGroups"

    @property
    def name(self) -> str:
        return self.names[-1] if self.names else self.resource_group

    def __str__(self) -> str:
        head = f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}"
        if not self.namespace:
            return head
        tail = "/".join(f"{t}/{n}" for t, n in zip(self.types, self.names))
        return f"{head}/providers/{self.namespace}/{tail}"

    def child(self, type_: str, name: str) -> ResourceId:
        return ResourceId(self.subscription, self.resource_group, self.namespace, (*self.types, type_),
                          (*self.names, name))


def resource_id(subscription: str, group: str, type_: str = "", *names: str) -> ResourceId:
    """`resource_id(s, rg, "Microsoft.Compute/virtualMachines/runCommands", vm, command)`."""
    if not type_:
        return ResourceId(subscription, group)
    namespace, *types = type_.split("/")
    return ResourceId(subscription, group, namespace, tuple(types), names)


# Typed GETs, keyed by lower-cased resource type. The same call works on sync clients (returns the model)
# and aio clients (returns an awaitable).
_GETTERS: dict[str, Callable[[ArmClients, ResourceId], Any]] = {
    "resourcegroups": lambda c, r: c.resources.resource_groups.get(r.resource_group),
    "microsoft.network/virtualnetworks": lambda c, r: c.network.virtual_networks.get(r.resource_group, r.name),
    "microsoft.network/networksecuritygroups":
        lambda c, r: c.network.network_security_groups.get(r.resource_group, r.name),
    "microsoft.network/publicipaddresses": lambda c, r: c.network.public_ip_addresses.get(r.resource_group, r.name),
    "microsoft.network/networkinterfaces": lambda c, r: c.network.network_interfaces.get(r.resource_group, r.name),
    "microsoft.compute/virtualmachines": lambda c, r: c.compute.virtual_machines.get(r.resource_group, r.name),
    "microsoft.compute/virtualmachines/runcommands": lambda c, r: c.compute.virtual_machine_run_commands
        .get_by_virtual_machine(r.resource_group, r.names[0], r.name, expand="instanceView"),
    "microsoft.compute/images": lambda c, r: c.compute.images.get(r.resource_group, r.name),
    "microsoft.compute/disks": lambda c, r: c.compute.disks.get(r.resource_group, r.name),
    "microsoft.compute/galleries": lambda c, r: c.compute.galleries.get(r.resource_group, r.name),
    "microsoft.compute/galleries/images": lambda c, r: c.compute.gallery_images.get(r.resource_group, *r.names),
    "microsoft.compute/galleries/images/versions": lambda c, r: c.compute.gallery_image_versions.get(
        r.resource_group, *r.names, expand="ReplicationStatus"),
    "microsoft.storage/storageaccounts":
        lambda c, r: c.storage.storage_accounts.get_properties(r.resource_group, r.name),
}

# Deletes (long operations), by the same keys; `submit` starts them without waiting.
_DELETERS: dict[str, Callable[[ArmClients, ResourceId], Callable[..., Any]]] = {
    "resourcegroups": lambda c, r: lambda **kw: c.resources.resource_groups.begin_delete(r.resource_group, **kw),
    "microsoft.network/virtualnetworks":
        lambda c, r: lambda **kw: c.network.virtual_networks.begin_delete(r.resource_group, r.name, **kw),
    "microsoft.network/networksecuritygroups":
        lambda c, r: lambda **kw: c.network.network_security_groups.begin_delete(r.resource_group, r.name, **kw),
    "microsoft.network/publicipaddresses":
        lambda c, r: lambda **kw: c.network.public_ip_addresses.begin_delete(r.resource_group, r.name, **kw),
    "microsoft.network/networkinterfaces":
        lambda c, r: lambda **kw: c.network.network_interfaces.begin_delete(r.resource_group, r.name, **kw),
    "microsoft.compute/virtualmachines":
        lambda c, r: lambda **kw: c.compute.virtual_machines.begin_delete(r.resource_group, r.name, **kw),
    "microsoft.compute/virtualmachines/runcommands": lambda c, r: lambda **kw: c.compute
        .virtual_machine_run_commands.begin_delete(r.resource_group, r.names[0], r.name, **kw),
    "microsoft.compute/images": lambda c, r: lambda **kw: c.compute.images.begin_delete(r.resource_group, r.name, **kw),
    "microsoft.compute/disks": lambda c, r: lambda **kw: c.compute.disks.begin_delete(r.resource_group, r.name, **kw),
    "microsoft.compute/galleries/images/versions": lambda c, r: lambda **kw: c.compute.gallery_image_versions
        .begin_delete(r.resource_group, *r.names, **kw),
}


def _key(rid: ResourceId) -> str:
    key = rid.type.lower()
    if key not in _GETTERS:
        raise ValueError(f"{rid}: goldsmith does not handle resources of type {rid.type}")
    return key


def get(clients: ArmClients, rid: ResourceId) -> dict[str, Any] | None:
    """The resource as REST JSON, or None if it does not exist (sync clients)."""
    try:
        return _GETTERS[_key(rid)](clients, rid).as_dict()
    except ResourceNotFoundError:
        return None


async def aget(clients: ArmClients, rid: ResourceId) -> dict[str, Any] | None:
    """The resource as REST JSON, or None if it does not exist (aio clients)."""
    try:
        return (await _GETTERS[_key(rid)](clients, rid)).as_dict()
    except ResourceNotFoundError:
        return None


def provisioning_state(resource: dict[str, Any] | None) -> str | None:
    return ((resource or {}).get("properties") or {}).get("provisioningState")


def submit(begin: Callable[..., Any], *args: Any, **kwargs: Any) -> str | None:
    """Start a long operation (a `begin_*` call) without waiting for it; return the URL that reports its
    status (Azure-AsyncOperation, else Location), None if it finished at once."""
    responses: list[Any] = []
    begin(*args, polling=False, raw_response_hook=lambda r: responses.append(r.http_response), **kwargs)
    headers = responses[-1].headers if responses else {}
    return headers.get("Azure-AsyncOperation") or headers.get("Location")


def delete(clients: ArmClients, rid: ResourceId) -> str | None:
    """Start deleting a resource; returns the operation URL."""
    return submit(_DELETERS[_key(rid)](clients, rid))


@contextlib.contextmanager
def errors(what: str) -> Iterator[None]:
    """ARM's refusals become BuildErrors naming the step; throttling, conflicts and server errors that
    outlived azure-core's retries stay retryable (the task's retry continues from what exists)."""
    try:
        yield
    except HttpResponseError as e:
        if is_transient(e):
            raise RuntimeError(f"{what}: {error_message(e)} (transient: the task retries)") from None
        raise BuildError(f"{what}: {error_message(e)}") from None
    except (ServiceRequestError, ServiceResponseError) as e:
        raise RuntimeError(f"{what}: ARM did not answer ({e}); the task retries") from None


def error_message(e: HttpResponseError) -> str:
    """`Code: message` from an ARM error body, with the HTTP status."""
    error = getattr(e, "error", None)
    code = getattr(error, "code", None)
    message = getattr(error, "message", None) or (e.message or "").split("\n")[0]
    return f"HTTP {e.status_code}: {code + ': ' if code else ''}{message}"


def is_transient(e: HttpResponseError) -> bool:
    """Worth a retry of the step: throttling, a conflicting operation still running, a server error.
    (azure-core already retried 408/429/5xx a few times before raising.)"""
    return e.status_code in (408, 409, 429) or (e.status_code or 0) >= 500


# --- waits -------------------------------------------------------------------------------------------------

TERMINAL_RUN_COMMAND_STATES = ("Succeeded", "Failed", "TimedOut", "Canceled")


@dataclass(frozen=True)
class Wait:
    """Something a trigger polls until it is over, as small JSON (it goes to XCom and the triggers table).

    kinds: `provisioned` (provisioningState Succeeded), `deleted` (GET says 404), `power` (the VM's
    PowerState is `state`), `run_command` (executionState terminal), `blob_copy` (the copy to the blob
    `id` is over; `state` names the storage account whose key reads it, or is empty for a SAS/token URL).
    `operation`: the long operation's status URL, when this process started it: its error explains a failure.
    """

    kind: str
    id: str
    label: str
    operation: str | None = None
    state: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Wait:
        return cls(**data)


@dataclass(frozen=True)
class Progress:
    done: bool
    error: str | None = None
    note: str | None = None  # logged when it changes (replication per region, power state, ...)


async def operation_status(clients: ArmClients, url: str) -> Progress | None:
    """The status of a long operation from its Azure-AsyncOperation or Location URL; None when the URL has
    expired or says nothing (then the resource itself is looked at)."""
    response = await clients.resources.send_request(HttpRequest("GET", url))
    if response.status_code == 404:
        return None
    if response.status_code == 202:
        return Progress(False)
    if response.status_code >= 400:
        try:
            body = response.json()
        except (ValueError, json.JSONDecodeError):
            body = {}
        error = body.get("error") or {}
        return Progress(True, f"HTTP {response.status_code}: {error.get('code', '')}: {error.get('message', '')}")
    try:
        body = response.json() or {}
    except (ValueError, json.JSONDecodeError):
        body = {}
    status = body.get("status")
    if status in ("Failed", "Canceled"):
        error = body.get("error") or {}
        return Progress(True, f"operation {status}: {error.get('code', '')}: {error.get('message', '')}".rstrip(": "))
    if status in (None, "Succeeded"):
        return Progress(True)
    return Progress(False, note=f"operation {status}")


async def check(clients: ArmClients, wait: Wait,
                blob_copy: Callable[[Wait], Awaitable[Progress]] | None = None) -> Progress:
    """One look at a wait (aio clients); `blob_copy` looks at a blob_copy wait."""
    if wait.operation:
        op = await operation_status(clients, wait.operation)
        if op is not None and op.error:
            return Progress(True, f"{wait.label}: {op.error}")
        if op is not None and not op.done:
            return op
    if wait.kind == "blob_copy":
        return await blob_copy(wait)
    rid = ResourceId.parse(wait.id)
    if wait.kind == "power":
        view = (await clients.compute.virtual_machines.instance_view(rid.resource_group, rid.name)).as_dict()
        states = [s["code"].split("/", 1)[1] for s in view.get("statuses") or []
                  if s.get("code", "").startswith("PowerState/")]
        return Progress(wait.state in states, note=f"power state {', '.join(states) or 'unknown'}")
    resource = await aget(clients, rid)
    if wait.kind == "deleted":
        return Progress(resource is None, note=f"provisioningState {provisioning_state(resource)}")
    if resource is None:
        return Progress(True, f"{wait.label} ({wait.id}) does not exist (deleted by someone else?)")
    state = provisioning_state(resource)
    if wait.kind == "run_command":
        view = resource["properties"].get("instanceView") or {}
        execution = view.get("executionState")
        if execution in TERMINAL_RUN_COMMAND_STATES:  # the step judges the exit code; its output goes to the log
            output = "\n".join(filter(None, (view.get("output"), view.get("error"))))
            return Progress(True, note=f"{execution}, exit code {view.get('exitCode')}\n{output}".rstrip())
        if state == "Failed":
            return Progress(True, f"{wait.label}: provisioningState Failed: {view.get('executionMessage', '')}")
        return Progress(False, note=f"execution {execution}")
    note = f"provisioningState {state}"
    replication = (resource["properties"].get("replicationStatus") or {}).get("summary")
    if replication:
        note += "; replication " + ", ".join(
            f"{r.get('region')} {r.get('state')} {r.get('progress', 0)}%" for r in replication)
    if state in ("Failed", "Canceled"):
        return Progress(True, f"{wait.label}: provisioningState {state}{_details(resource)}")
    return Progress(state == "Succeeded", note=note)


def _details(resource: dict[str, Any]) -> str:
    """Failure details ARM puts in the resource: instance view statuses, replication errors."""
    props = resource.get("properties") or {}
    messages = [s.get("message") for s in (props.get("instanceView") or {}).get("statuses") or [] if s.get("message")]
    messages += [f"{r.get('region')}: {r.get('details')}" for r in
                 (props.get("replicationStatus") or {}).get("summary") or [] if r.get("state") == "Failed"]
    return f": {'; '.join(messages)}" if messages else ""

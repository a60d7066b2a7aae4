"""The double's vocabulary: ARM errors, responses, resources, long-running operations, latencies, faults."""

from __future__ import annotations

import copy
import datetime
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def norm_location(location: str) -> str:
    """ARM answers with the normalized region name: 'West US 2' -> 'westus2'."""
    return location.replace(" ", "").lower()


# The public regions the double knows (ARM's `az account list-locations`, abridged): a location outside
# them is refused as ARM refuses it.
REGIONS = frozenset({
    "eastus", "eastus2", "westus", "westus2", "westus3", "centralus", "northcentralus", "southcentralus",
    "westcentralus", "canadacentral", "brazilsouth", "northeurope", "westeurope", "uksouth", "ukwest",
    "francecentral", "germanywestcentral", "swedencentral", "norwayeast", "switzerlandnorth", "polandcentral",
    "italynorth", "spaincentral", "uaenorth", "southafricanorth", "centralindia", "southeastasia", "eastasia",
    "japaneast", "koreacentral", "australiaeast"})
MAX_TAGS, MAX_TAG_NAME, MAX_TAG_VALUE = 50, 512, 256  # ARM's limits per resource and resource group


def check_location(location: str, resource_type: str) -> str:
    """The normalized location, or ARM's refusal of a region that does not exist."""
    region = norm_location(location)
    if region not in REGIONS:
        raise ArmError(400, "LocationNotAvailableForResourceType",
                       f"The provided location '{location}' is not available for resource type '{resource_type}'. "
                       f"List of available regions for the resource type is '{','.join(sorted(REGIONS))}'.")
    return region


def check_tags(tags: dict | None) -> dict:
    tags = dict(tags or {})
    if len(tags) > MAX_TAGS:
        raise ArmError(400, "InvalidTagCount", f"The number of tags ({len(tags)}) exceeds the limit of {MAX_TAGS} "
                       "tags per resource.")
    for name, value in tags.items():
        if len(name) > MAX_TAG_NAME:
            raise ArmError(400, "InvalidTagNameLength", f"The tag name '{name[:40]}...' exceeds the maximum "
                           f"length of {MAX_TAG_NAME} characters.")
        if len(str(value)) > MAX_TAG_VALUE:
            raise ArmError(400, "InvalidTagValueLength", f"The tag value '{str(value)[:40]}...' of tag '{name}' "
                           f"exceeds the maximum length of {MAX_TAG_VALUE} characters.")
    return tags


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


class ArmError(Exception):
    """An ARM error response: `{"error": {"code", "message"}}` with an HTTP status."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


def not_found(type_: str, name: str, group: str) -> ArmError:
    return ArmError(404, "ResourceNotFound",
                    f"The Resource '{type_}/{name}' under resource group '{group}' was not found. "
                    "For more details please go to https://aka.ms/ARMResourceNotFoundFix")


def group_not_found(group: str) -> ArmError:
    return ArmError(404, "ResourceGroupNotFound", f"Resource group '{group}' could not be found.")


@dataclass
class Response:
    status: int
    body: Any = None  # dict/list -> JSON, bytes as is, None -> empty
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Latency:
    """How long an operation kind takes: it completes at the first status poll after at least `polls`
    polls and `seconds` seconds. `retry_after` is the Retry-After of its status polls: the SDK's pollers
    sleep that long between polls (fractions of a second keep tests fast; ARM sends whole seconds).
    The response that starts it carries the whole seconds of it."""

    polls: int = 1
    seconds: float = 0.0
    retry_after: float = 0.01


@dataclass
class Resource:
    id: str
    type: str  # canonical, e.g. Microsoft.Network/virtualNetworks
    doc: dict  # the ARM JSON as stored (what GET returns before computed fields are added)
    op: Operation | None = None  # the pending create/update/delete/action, while it runs
    state: dict = field(default_factory=dict)  # handler-private (e.g. a VM's guest)

    @property
    def name(self) -> str:
        return self.doc["name"]

    @property
    def properties(self) -> dict:
        return self.doc.setdefault("properties", {})


@dataclass
class Operation:
    """One long-running operation, polled through Azure-AsyncOperation and/or Location URLs."""

    id: str
    kind: str  # e.g. virtualMachines/create, resourceGroups/delete: selects its Latency
    latency: Latency
    finish: Callable[[], Any]  # runs once when the operation completes; its return value is the result
    ready: Callable[[], bool] | None = None  # e.g. a run command's script has exited
    failure: ArmError | None = None  # injected: the operation ends Failed with this error
    on_failure: Callable[[], None] | None = None
    status: str = "InProgress"
    result: Any = None
    error: ArmError | None = None
    polls: int = 0
    started: float = field(default_factory=time.monotonic)
    start_time: str = field(default_factory=now_iso)
    end_time: str | None = None

    @property
    def done(self) -> bool:
        return self.status != "InProgress"

    def poll(self) -> None:
        """Count a poll and complete the operation once its latency has passed."""
        if self.done:
            return
        self.polls += 1
        if self.polls < self.latency.polls or time.monotonic() - self.started < self.latency.seconds:
            return
        if self.ready and not self.ready() and not self.failure:
            return
        self.end_time = now_iso()
        try:
            if self.failure:
                raise self.failure
            self.result = self.finish()
            self.status = "Succeeded"
        except ArmError as e:
            self.status, self.error = "Failed", e
            if self.on_failure:
                self.on_failure()

    def status_body(self) -> dict:
        body = {"name": self.id, "status": self.status, "startTime": self.start_time}
        if self.end_time:
            body["endTime"] = self.end_time
        if self.error:
            body["error"] = self.error.body()["error"]
        if self.status == "Succeeded" and self.result is not None:
            body["properties"] = {"output": copy.deepcopy(self.result)}
        return body


FAULT_KINDS = ("throttle", "error", "conflict", "lro_failed", "drop", "drop_after", "slow")


@dataclass
class Fault:
    """Makes the next `times` requests matching `method` and `path` (a regex searched in the URL
    path, case-insensitive) misbehave:

    - throttle: 429 with Retry-After `retry_after` seconds (code TooManyRequests)
    - error: `status` (500) with `code` (InternalServerError)
    - conflict: 409 with `code` (Conflict), e.g. AnotherOperationInProgress
    - lro_failed: the request is accepted, and the operation it starts ends Failed with `code`
      (a PUT leaves the resource behind with provisioningState Failed, as ARM does)
    - drop: the connection is closed without a response, before the request is processed
    - drop_after: the request is processed, then the connection is closed (the response is lost)
    - slow: the response is delayed by `delay` seconds
    """

    kind: str
    method: str = "*"
    path: str = ".*"
    times: int = 1
    status: int | None = None
    code: str | None = None
    message: str | None = None
    retry_after: float = 1.0
    delay: float = 1.0
    hits: int = 0

    def __post_init__(self):
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {FAULT_KINDS}")
        self._path = re.compile(self.path, re.IGNORECASE)

    def matches(self, method: str, path: str) -> bool:
        return (self.hits < self.times and self.method in ("*", method.upper())
                and self._path.search(path) is not None)

    def error(self) -> ArmError:
        """The error this fault answers with (or an lro_failed operation ends with)."""
        if self.kind == "throttle":
            return ArmError(429, self.code or "TooManyRequests",
                            self.message or "The request is being throttled. Retry after the interval "
                            "given in the Retry-After header.",
                            {"Retry-After": seconds_header(self.retry_after)})
        if self.kind == "conflict":
            return ArmError(self.status or 409, self.code or "Conflict",
                            self.message or "The request conflicts with an operation in progress.")
        if self.kind == "lro_failed":  # the status shows only where a Location poll reports the failure
            return ArmError(self.status or 400, self.code or "InternalOperationError",
                            self.message or "The operation failed (injected by the ARM test double).")
        return ArmError(self.status or 500, self.code or "InternalServerError",
                        self.message or "Encountered internal server error (injected by the ARM test double).")


def seconds_header(value: float) -> str:
    """Retry-After's value: whole seconds as ARM sends them, or a fraction (azure-core parses floats)."""
    return str(int(value)) if float(value).is_integer() else str(value)


def new_guid() -> str:
    return str(uuid.uuid4())


class ResourceType:
    """How one ARM resource type behaves. The double does the generic parts (ids, PUT/GET/PATCH/DELETE,
    operations, listing); a subclass validates and fills in what ARM would, and adds actions as
    methods named `<http method>_<action>` (e.g. `post_deallocate`, `get_instanceview`)."""

    type = ""  # canonical, e.g. Microsoft.Network/virtualNetworks
    tracked = True  # has location and tags (child resources like subnets do not)
    creating_state = "Creating"  # provisioningState while a PUT creates it (network says Updating)
    # How a PUT that creates it answers (ARM's services differ): status, polling headers, body or not.
    create_status, create_headers, create_body = 201, ("Azure-AsyncOperation",), True
    synchronous_delete = False  # DELETE answers 200 at once instead of 202 + operation

    def __init__(self, double):
        self.double = double

    @property
    def namespace(self) -> str:
        return self.type.split("/")[0]

    def validate(self, res: Resource, existing: Resource | None, group: Resource) -> None:
        """Check a PUT (raise ArmError) and fill in what ARM adds. `res.doc` holds the request's id, name,
        type, location, tags and properties; `existing` is the resource it replaces."""

    def provision(self, res: Resource) -> None:
        """When the create/update operation completes (may raise ArmError: the operation fails)."""

    def ready(self, res: Resource) -> bool:
        """Whether the create/update operation may complete yet (its latency has passed)."""
        return True

    def patch(self, res: Resource, properties: dict) -> None:
        res.properties.update(copy.deepcopy(properties))

    def view(self, res: Resource, query: dict) -> dict:
        """What GET returns: the stored document plus what ARM computes (back references, state)."""
        return copy.deepcopy(res.doc)

    def check_delete(self, res: Resource) -> None:
        """Raise ArmError if ARM would refuse to delete it (e.g. in use)."""

    def delete(self, res: Resource) -> None:
        """Side effects of removal (stop a VM's sshd, free an address)."""

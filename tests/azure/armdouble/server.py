"""The ARM test double: an HTTPS server speaking the subset of Azure Resource Manager (and of Entra ID's
token endpoint) that an AIB-style build uses, so the real azure-identity and azure-mgmt-* clients
(sync and .aio) run against it unmodified. All state is in memory; one lock serializes requests.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
import socket
import ssl
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, parse_qsl, unquote, urlsplit

from . import schema
from .core import (ArmError, Fault, Latency, Operation, Resource, ResourceType, Response, check_location, check_tags,
                   group_not_found, new_guid, norm_location, not_found, seconds_header)
from .tls import make_server_context

TENANT_ID = "72f988bf-86f1-41af-91ab-2d7cd011db47"
SUBSCRIPTION_ID = "00000000-0000-4000-8000-00000000a1b2"
CLIENT_ID = "5f3c6e52-0d3f-4a0c-9a64-goldsmithtest"
CLIENT_SECRET = "armdouble-secret"  # not a secret: the double accepts only this one
TOKEN_LIFETIME = 3600


@dataclass
class Call:
    """One request the double received, for assertions on what a client did."""

    method: str
    path: str
    query: dict[str, str]
    status: int | None = None


class _Drop(Exception):
    """Close the connection without a response."""


class ArmDouble:
    """Start with `with ArmDouble() as arm:` (or start()/stop()). See tests/azure/conftest.py for use."""

    def __init__(self, *, blob_store=None, tenant_id: str = TENANT_ID, subscription_id: str = SUBSCRIPTION_ID,
                 client_id: str = CLIENT_ID, client_secret: str = CLIENT_SECRET):
        from . import compute, network, storage  # the resource types register themselves on the double
        self.tenant_id, self.subscription_id = tenant_id, subscription_id
        self.client_id, self.client_secret = client_id, client_secret
        self.federated_token = "armdouble-federated-token"  # the client assertion workload identity sends
        self.identity_header = "armdouble-identity-header"  # managed identity's IDENTITY_HEADER secret
        self.blob_store = blob_store  # Azurite, for disk SAS grants and VHD sources; None: those fail
        self._lock = threading.RLock()
        self._tokens: dict[str, float] = {}  # kept across resets: clients cache their tokens
        self._types: dict[str, ResourceType] = {}
        for module in (network, compute, storage):
            for cls in module.TYPES:
                handler = cls(self)
                self._types[handler.type.lower()] = handler
        self.marketplace = compute.Marketplace()
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.reset()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> ArmDouble:
        self._tmp = tempfile.TemporaryDirectory(prefix="goldsmith-armdouble-")
        self.directory = Path(self._tmp.name)
        context, self.ca_path = make_server_context(self.directory)
        self._server = _Server(("127.0.0.1", 0), _Handler, self, context)
        self.port = self._server.server_address[1]
        self.endpoint = f"https://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="armdouble", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, power off every VM and delete the double's files."""
        with self._lock:
            self._clear()
        if self._server:
            self._server.shutdown()
            self._server.close_connections()
            self._server.server_close()
            self._thread.join()
            self._server = self._thread = None
        if self._tmp:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> ArmDouble:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def authority(self) -> str:
        """What azure-identity credentials take as `authority` (with disable_instance_discovery=True)."""
        return self.endpoint

    # -- what tests use ----------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every resource, operation, fault, latency and recorded call (VMs are powered off)."""
        with self._lock:
            if hasattr(self, "_resources"):
                self._clear()
            self._resources: dict[str, Resource] = {}
            self._groups: dict[str, Resource] = {}
            self._ops: dict[str, Operation] = {}
            self._kept: list[str] = []
            self.faults: list[Fault] = []
            self.calls: list[Call] = []
            self.internal_errors: list[str] = []
            self.run_commands: list[dict] = []
            self.windows_run_command = lambda vm, command_id, script, parameters: ("", "")
            self.addresses: set[str] = set()
            self.latency: dict[str, Latency] = {"*": Latency()}
            self.marketplace.accepted.clear()  # terms a test accepted
            self._lro_fault: Fault | None = None

    def _clear(self) -> None:
        for res in list(self._resources.values()):
            self.remove(res)
        self._groups.clear()

    def inject(self, kind: str, method: str = "*", path: str = ".*", **options) -> Fault:
        """Add a fault (see `Fault` for the kinds and options); returns it so tests can read `hits`."""
        fault = Fault(kind, method, path, **options)
        with self._lock:
            self.faults.append(fault)
        return fault

    def set_latency(self, kind: str = "*", **latency) -> None:
        """Latency for an operation kind such as virtualMachines/create, versions/create,
        resourceGroups/delete, virtualMachines/runCommand; "*" for every other kind."""
        self.latency[kind] = Latency(**latency)

    def resources(self) -> list[str]:
        """Ids of every resource group and resource that exists, sorted."""
        with self._lock:
            return sorted([g.id for g in self._groups.values()] + [r.id for r in self._resources.values()])

    def get(self, resource_id: str) -> dict | None:
        """A resource (or group) as GET would return it (without counting a poll), or None."""
        with self._lock:
            if group := self._groups.get(resource_id.lower()):
                return copy.deepcopy(group.doc)
            res = self._resources.get(resource_id.lower())
            return self._types[res.type.lower()].view(res, {}) if res else None

    def seed(self, resource_id: str, body: dict) -> dict:
        """Create a resource (or group) directly, as if it existed before the test, and return it.
        Its create operation completes at once (a VM's sshd is started). Seeded resources are not
        leftovers; what a test creates inside them is."""
        with self._lock:
            before = set(self._resources)
            response = self._route("PUT", urlsplit(resource_id).path, {"api-version": "seed"}, body)
            res = self._groups.get(resource_id.lower()) or self._resources[resource_id.lower()]
            if res.op:
                res.op.latency = Latency(polls=0)
                res.op.poll()
                if res.op.error:
                    raise res.op.error
            res.state["seeded"] = True
            for key in set(self._resources) - before:  # created with it: inline subnets, a VM's OS disk
                self._resources[key].state["seeded"] = True
            return response.body if res.op is None else self.get(resource_id)

    def keep(self, *resource_ids: str) -> None:
        """Declare resources (and what is inside them) that may remain after the test: its outputs."""
        self._kept.extend(i.lower() for i in resource_ids)

    def leftovers(self) -> list[str]:
        """Resources that exist but were neither seeded nor kept: what a test left behind."""
        with self._lock:
            everything = list(self._groups.values()) + list(self._resources.values())
            return sorted(r.id for r in everything if not r.state.get("seeded")
                          and not any(r.id.lower() == k or r.id.lower().startswith(k + "/") for k in self._kept))

    def guests(self) -> list:
        """Every Linux VM's guest (VmHost), running or not."""
        with self._lock:
            return [r.state["guest"] for r in self._resources.values() if r.state.get("guest")]

    def vm_guest(self, vm_id: str):
        """The VmHost behind a Linux VM (None for Windows VMs): its sshd pid, addresses, run_script()."""
        with self._lock:
            return self._resources[vm_id.lower()].state.get("guest")

    # -- HTTP entry point ---------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, headers, raw_body: bytes) -> Response:
        url = urlsplit(raw_path)
        path = unquote(url.path)
        query = {k.lower(): v for k, v in parse_qsl(url.query, keep_blank_values=True)}
        call = Call(method, path, query)
        with self._lock:
            self.calls.append(call)
            fault = next((f for f in self.faults if f.matches(method, path)), None)
            if fault and fault.kind != "lro_failed":
                fault.hits += 1
        if fault and fault.kind == "slow":
            time.sleep(fault.delay)
        if fault and fault.kind == "drop":
            raise _Drop()
        try:
            if fault and fault.kind in ("throttle", "error", "conflict"):
                raise fault.error()
            with self._lock:
                self._lro_fault = fault if fault and fault.kind == "lro_failed" else None
                try:
                    response = self._serve(method, path, query, headers, raw_body)
                finally:
                    self._lro_fault = None
        except ArmError as e:
            response = Response(e.status, e.body(), e.headers)
        except Exception:
            self.internal_errors.append(f"{method} {raw_path}\n{traceback.format_exc()}")
            response = Response(500, {"error": {"code": "InternalServerError",
                                                "message": "ARM test double bug; see arm_double.internal_errors"}})
        call.status = response.status
        if fault and fault.kind == "drop_after":
            raise _Drop()
        return response

    def _serve(self, method, path, query, headers, raw_body) -> Response:
        if m := re.fullmatch(r"/([^/]+)/v2\.0/\.well-known/openid-configuration", path):
            return self._openid_configuration(m.group(1))
        if m := re.fullmatch(r"/([^/]+)/oauth2/v2\.0/token", path):
            return self._token(m.group(1), raw_body)
        if path == "/msi/token":
            return self._managed_identity_token(headers, query)
        self._authorize(headers)
        if "api-version" not in query:
            raise ArmError(400, "MissingApiVersionParameter",
                           "The api-version query parameter (?api-version=) is required for all requests.")
        body = None
        if raw_body:
            try:
                body = json.loads(raw_body)
            except ValueError as e:
                raise ArmError(400, "InvalidRequestContent", f"The request content was invalid: {e}")
        return self._route(method, path, query, body)

    # -- Entra ID (client secret and client assertion flows) and managed identity ---------------

    def _openid_configuration(self, tenant: str) -> Response:
        base = f"{self.endpoint}/{tenant}"
        return Response(200, {
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "issuer": f"{self.endpoint}/{self.tenant_id}/v2.0",
            "jwks_uri": f"{base}/discovery/v2.0/keys",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt",
                                                      "client_secret_basic"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "tenant_region_scope": "NA",
        })

    def _token(self, tenant: str, raw_body: bytes) -> Response:
        form = {k: v[0] for k, v in parse_qs(raw_body.decode()).items()}

        def refuse(status, error, description):
            return Response(status, {"error": error, "error_description": description,
                                     "error_codes": [int(re.match(r"AADSTS(\d+)", description).group(1))]})

        if tenant not in (self.tenant_id, "organizations"):
            return refuse(400, "invalid_request", f"AADSTS900023: Specified tenant identifier '{tenant}' "
                          "is neither a valid DNS name, nor a valid external domain.")
        if form.get("grant_type") != "client_credentials":
            return refuse(400, "unsupported_grant_type", "AADSTS700003: the ARM double supports only "
                          "client_credentials (client secret or client assertion).")
        if form.get("client_id") != self.client_id:
            return refuse(400, "unauthorized_client", f"AADSTS700016: Application with identifier "
                          f"'{form.get('client_id')}' was not found in the directory.")
        secret_ok = form.get("client_secret") == self.client_secret
        assertion_ok = form.get("client_assertion") == self.federated_token
        if not (secret_ok or assertion_ok):
            return refuse(401, "invalid_client", "AADSTS7000215: Invalid client secret provided. Ensure the "
                          "secret being sent in the request is the client secret value, not the client secret ID.")
        return Response(200, {"token_type": "Bearer", "expires_in": TOKEN_LIFETIME,
                               "ext_expires_in": TOKEN_LIFETIME, "access_token": self._issue_token()})

    def _managed_identity_token(self, headers, query: dict) -> Response:
        """The managed identity endpoint of App Service/Functions/Arc (IDENTITY_ENDPOINT, IDENTITY_HEADER),
        which azure-identity's ManagedIdentityCredential uses when those variables are set."""
        if headers.get("X-IDENTITY-HEADER") != self.identity_header:
            return Response(401, {"error": "invalid_request", "error_description": "X-IDENTITY-HEADER is wrong."})
        token = self._issue_token()
        return Response(200, {"access_token": token, "expires_on": str(int(time.time()) + TOKEN_LIFETIME),
                              "resource": query.get("resource", ""), "token_type": "Bearer"})

    def _issue_token(self) -> str:
        token = "armdouble." + secrets.token_urlsafe(24)
        self._tokens[token] = time.time() + TOKEN_LIFETIME
        return token

    def _authorize(self, headers) -> None:
        auth = headers.get("Authorization") or ""
        token = auth[7:] if auth.startswith("Bearer ") else None
        if token is None:
            raise ArmError(401, "AuthenticationFailed", "Authentication failed. The 'Authorization' header is missing.",
                           {"WWW-Authenticate": f'Bearer authorization_uri="{self.endpoint}/{self.tenant_id}", '
                                                'error="invalid_token", error_description="missing token"'})
        if self._tokens.get(token, 0) < time.time():
            raise ArmError(401, "InvalidAuthenticationToken", "The access token is invalid or has expired.",
                           {"WWW-Authenticate": f'Bearer authorization_uri="{self.endpoint}/{self.tenant_id}", '
                                                'error="invalid_token", error_description="expired"'})

    # -- routing ------------------------------------------------------------------------------

    def _route(self, method: str, path: str, query: dict, body) -> Response:
        seg = [s for s in path.split("/") if s]
        low = [s.lower() for s in seg]
        if len(seg) < 2 or low[0] != "subscriptions":
            raise ArmError(404, "NotFound", f"No route for {method} {path} in the ARM test double.")
        if seg[1].lower() != self.subscription_id.lower():
            raise ArmError(404, "SubscriptionNotFound", f"The subscription '{seg[1]}' could not be found.")
        rest, lrest = seg[2:], low[2:]
        if len(rest) >= 2 and lrest[-2] in ("operations", "operationresults") and (
                len(rest) == 2 or (lrest[0] == "providers" and len(rest) == 6 and lrest[2] == "locations")):
            return self._poll(rest[-1], status_monitor=lrest[-2] == "operations")
        if lrest[:1] == ["providers"]:
            if len(rest) >= 5 and lrest[1] == "microsoft.compute" and lrest[2:5:2] == ["locations", "publishers"]:
                return self.marketplace.serve(self, method, rest[3], rest[5:], query)
            if lrest[1:3] == ["microsoft.compute", "skus"] and len(rest) == 3 and method == "GET":
                return Response(200, {"value": self._resource_skus(query)})
            if lrest[1] == "microsoft.marketplaceordering":
                return self.marketplace.agreement(self, method, rest[2:], body)
            if len(rest) == 3 and method == "GET":
                return Response(200, {"value": self._list(f"{rest[1]}/{rest[2]}", None, query)})
        if lrest[:1] == ["resourcegroups"]:
            if len(rest) == 1 and method == "GET":
                return Response(200, {"value": self._list_groups(query)})
            if len(rest) == 2:
                return self._group_request(method, rest[1], body)
            group = self._group(rest[1])
            if len(rest) == 3 and lrest[2] == "resources" and method == "GET":
                return Response(200, {"value": self._list_group_resources(group)})
            if len(rest) >= 5 and lrest[2] == "providers":
                return self._resource_request(method, group, rest[3], rest[4:], query, body)
        raise ArmError(404, "NotFound", f"No route for {method} {path} in the ARM test double.")

    def _resource_skus(self, query: dict) -> list[dict]:
        """resourceSkus: one entry per VM size and region it is offered in ($filter=location eq 'x')."""
        from .compute import VM_SKUS
        from .core import REGIONS
        wanted = REGIONS
        if expression := query.get("$filter"):
            m = re.fullmatch(r"\s*location eq '([^']*)'\s*", expression, re.IGNORECASE)
            if not m:
                raise ArmError(400, "InvalidFilterInQueryString", f"Invalid $filter '{expression}': resourceSkus "
                               "supports location eq '<region>'.")
            wanted = {norm_location(m.group(1))}
        return [sku.listing(region) for sku in VM_SKUS for region in sorted(wanted)
                if region in REGIONS and sku.offered(region)]

    # -- long-running operations --------------------------------------------------------------

    def start_operation(self, kind: str, finish, *, on_failure=None, ready=None) -> Operation:
        """An operation that completes (running `finish`) after the kind's latency and once `ready()`,
        or fails as an lro_failed fault matching the current request says."""
        latency = self.latency.get(kind) or self.latency["*"]
        op = Operation(new_guid(), kind, latency, finish, ready=ready, on_failure=on_failure)
        if self._lro_fault:
            self._lro_fault.hits += 1
            op.failure = self._lro_fault.error()
            self._lro_fault = None
        self._ops[op.id] = op
        return op

    def operation_headers(self, op: Operation, namespace: str, location: str, *,
                          status_monitor: bool = True, location_header: bool = True) -> dict[str, str]:
        """Azure-AsyncOperation (status monitor) and/or Location (result) URLs, with Retry-After."""
        base = f"{self.endpoint}/subscriptions/{self.subscription_id}/providers/{namespace}/locations/{location}"
        headers = {"Retry-After": _initial_retry_after(op)}
        if status_monitor:
            headers["Azure-AsyncOperation"] = f"{base}/operations/{op.id}?api-version=2024-07-01"
        if location_header:
            headers["Location"] = f"{base}/operationResults/{op.id}?api-version=2024-07-01"
        return headers

    def _poll(self, op_id: str, *, status_monitor: bool) -> Response:
        op = self._ops.get(op_id)
        if op is None:
            raise ArmError(404, "OperationNotFound", f"The operation '{op_id}' was not found.")
        op.poll()
        retry = {"Retry-After": seconds_header(op.latency.retry_after)}
        if status_monitor:
            return Response(200, op.status_body(), {} if op.done else retry)
        if not op.done:
            return Response(202, None, retry)
        if op.error:
            return Response(op.error.status, op.error.body())
        return Response(200, copy.deepcopy(op.result)) if op.result is not None else Response(204)

    # -- resource groups ----------------------------------------------------------------------

    def _group(self, name: str) -> Resource:
        group = self._groups.get(self._group_id(name).lower())
        if group is None:
            raise group_not_found(name)
        return group

    def _group_id(self, name: str) -> str:
        return f"/subscriptions/{self.subscription_id}/resourceGroups/{name}"

    def _advance(self, res: Resource) -> bool:
        """A look at a resource counts as a poll of its pending operation (so a client that watches
        provisioningState sees it progress); False if that completed a delete."""
        if res.op:
            res.op.poll()
        return res.id.lower() in self._resources or res.id.lower() in self._groups

    def _group_request(self, method: str, name: str, body) -> Response:
        group = self._groups.get(self._group_id(name).lower())
        if method == "HEAD":
            return Response(204 if group else 404)
        if method == "PUT":
            body = body or {}
            if not body.get("location"):
                raise ArmError(400, "LocationRequired", "The location property is required for this definition.")
            if group and group.doc["properties"]["provisioningState"] == "Deleting":
                raise ArmError(409, "ResourceGroupBeingDeleted",
                               f"The resource group '{group.name}' is in deprovisioning state and cannot perform "
                               "this operation.")
            if group and norm_location(group.doc["location"]) != norm_location(body["location"]):
                raise ArmError(409, "InvalidResourceGroupLocation",
                               f"Invalid resource group location '{body['location']}'. The Resource group already "
                               f"exists in location '{group.doc['location']}'.")
            if not re.fullmatch(r"[-\w._()]{1,90}", name) or name.endswith("."):
                raise ArmError(400, "InvalidResourceGroup", f"The provided resource group name '{name}' has these "
                               "invalid characters or is longer than 90 characters.")
            check_location(body["location"], "Microsoft.Resources/resourceGroups")
            tags = check_tags(body.get("tags"))
            created = group is None
            if created:
                group = Resource(self._group_id(name), "Microsoft.Resources/resourceGroups", {
                    "id": self._group_id(name), "name": name, "type": "Microsoft.Resources/resourceGroups",
                    "location": norm_location(body["location"]), "properties": {"provisioningState": "Succeeded"}})
                self._groups[group.id.lower()] = group
            group.doc["tags"] = tags
            if body.get("managedBy"):
                group.doc["managedBy"] = body["managedBy"]
            return Response(201 if created else 200, copy.deepcopy(group.doc))
        if group is None:
            if method == "DELETE":
                return Response(404, group_not_found(name).body())
            raise group_not_found(name)
        if method == "GET":
            if not self._advance(group):
                raise group_not_found(name)
            return Response(200, copy.deepcopy(group.doc))
        if method == "PATCH":
            if body and "tags" in body:
                group.doc["tags"] = check_tags(body["tags"])
            return Response(200, copy.deepcopy(group.doc))
        if method == "DELETE":
            if group.op and not group.op.done:  # a second delete joins the first
                op = group.op
            else:
                group.doc["properties"]["provisioningState"] = "Deleting"
                op = self.start_operation("resourceGroups/delete", lambda: self._delete_group(group),
                                          on_failure=lambda: group.doc["properties"].update(provisioningState="Succeeded"))
                group.op = op
            location = f"{self.endpoint}/subscriptions/{self.subscription_id}/operationresults/{op.id}?api-version=2025-04-01"
            return Response(202, None, {"Location": location, "Retry-After": _initial_retry_after(op)})
        raise ArmError(405, "MethodNotAllowed", f"{method} is not supported on resource groups.")

    def _delete_group(self, group: Resource) -> None:
        prefix = group.id.lower() + "/"
        for key in sorted((k for k in self._resources if k.startswith(prefix)), key=len, reverse=True):
            self.remove(self._resources[key])
        del self._groups[group.id.lower()]

    def _list_groups(self, query: dict) -> list[dict]:
        match = _tag_filter(query.get("$filter"))
        return [copy.deepcopy(g.doc) for g in list(self._groups.values())
                if self._advance(g) and match(g.doc.get("tags") or {})]

    def _list_group_resources(self, group: Resource) -> list[dict]:
        prefix = group.id.lower() + "/"
        out = []
        for key, res in self._resources.items():
            if key.startswith(prefix) and self._types[res.type.lower()].tracked:
                out.append({k: res.doc[k] for k in ("id", "name", "type", "location", "tags", "sku", "kind",
                                                    "managedBy") if k in res.doc})
        return out

    # -- resources ----------------------------------------------------------------------------

    def handler(self, type_: str) -> ResourceType:
        return self._types[type_.lower()]

    def find(self, resource_id: str | None) -> Resource | None:
        return self._resources.get(resource_id.lower()) if resource_id else None

    def add(self, res: Resource) -> None:
        self._resources[res.id.lower()] = res

    def find_all(self, type_: str) -> list[Resource]:
        return [r for r in self._resources.values() if r.type.lower() == type_.lower()]

    def _list(self, type_: str, scope: str | None, query: dict) -> list[dict]:
        handler = self._types.get(type_.lower())
        if handler is None:
            raise ArmError(400, "InvalidResourceType", f"The resource type '{type_}' is not implemented by the "
                           "ARM test double (tests/azure/armdouble).")
        scope = (scope or f"/subscriptions/{self.subscription_id}/").lower()
        return [handler.view(r, query) for r in list(self._resources.values())
                if r.type.lower() == type_.lower() and r.id.lower().startswith(scope) and self._advance(r)]

    def _resource_request(self, method, group: Resource, namespace: str, seg: list[str], query, body) -> Response:
        types, names = seg[0::2], seg[1::2]
        type_ = f"{namespace}/{'/'.join(types)}"
        handler = self._types.get(type_.lower())
        if len(seg) % 2 == 1:
            if handler is not None:  # a collection: list the children
                scope = f"{group.id}/providers/{namespace}/" + "/".join(seg[:-1])
                return Response(200, {"value": self._list(type_, scope.rstrip("/") + "/", query)})
            types, action = types[:-1], seg[-1]
            type_ = f"{namespace}/{'/'.join(types)}"
            handler = self._types.get(type_.lower())
        else:
            action = None
        if handler is None:
            raise ArmError(400, "InvalidResourceType", f"The resource type '{type_}' is not implemented by the "
                           "ARM test double (tests/azure/armdouble).")
        canonical = handler.type.split("/")[1:]
        rid = f"{group.id}/providers/{handler.type.split('/')[0]}/" + "/".join(
            f"{t}/{n}" for t, n in zip(canonical, names))
        parent = rid.rsplit("/", 2)[0]
        if len(canonical) > 1 and parent.lower() not in self._resources:
            raise ArmError(404, "ParentResourceNotFound",
                           f"Failed to perform '{'read' if method == 'GET' else 'write'}' on resource(s) of type "
                           f"'{'/'.join(canonical)}', because the parent resource '{parent}' could not be found.")
        res = self._resources.get(rid.lower())
        if action:
            if res is None:
                raise not_found(handler.type, names[-1], group.name)
            fn = getattr(handler, f"{method.lower()}_{action.lower()}", None)
            if fn is None:
                raise ArmError(404 if method == "GET" else 400, "InvalidResourceType" if method == "GET" else
                               "UnsupportedAction", f"'{method} {action}' on {handler.type} is not implemented "
                               "by the ARM test double (tests/azure/armdouble).")
            return fn(res, query, body or {})
        if method == "GET":
            if res is None or not self._advance(res):
                raise not_found(handler.type, names[-1], group.name)
            return Response(200, handler.view(res, query))
        if method == "PUT":
            return self._put(handler, rid, group, names[-1], res, body or {}, query)
        if method == "PATCH":
            if res is None:
                raise not_found(handler.type, names[-1], group.name)
            return self._patch(handler, res, body or {}, query)
        if method == "DELETE":
            if res is None:
                return Response(204)
            return self._delete(handler, res)
        raise ArmError(405, "MethodNotAllowed", f"{method} is not supported on {handler.type}.")

    def _put(self, handler: ResourceType, rid, group, name, existing, body, query) -> Response:
        if existing and existing.op and not existing.op.done:
            raise ArmError(409, "AnotherOperationInProgress" if "Compute" in handler.type else "Conflict",
                           f"Operation on '{rid}' is not allowed: another operation is in progress.")
        doc = {"id": rid, "name": name, "type": handler.type}
        if handler.tracked:
            if not body.get("location"):
                raise ArmError(400, "LocationRequired", "The location property is required for this definition.")
            doc["location"] = check_location(body["location"], handler.type)
            doc["tags"] = check_tags(body.get("tags"))
        schema.check(handler.type, body)
        for key in ("sku", "plan", "identity", "zones", "kind", "extendedLocation"):
            if key in body:
                doc[key] = copy.deepcopy(body[key])
        doc["properties"] = copy.deepcopy(body.get("properties") or {})
        res = Resource(rid, handler.type, doc, state=existing.state if existing else {})
        handler.validate(res, existing, group)
        res.properties["provisioningState"] = handler.creating_state if existing is None else "Updating"
        self._resources[rid.lower()] = res

        def finish():
            handler.provision(res)
            res.properties["provisioningState"] = "Succeeded"
            return handler.view(res, {}) if "Location" in handler.create_headers else None

        def failed():
            res.properties["provisioningState"] = "Failed"

        verb = "create" if existing is None else "update"
        res.op = self.start_operation(f"{handler.type.split('/')[-1]}/{verb}", finish, on_failure=failed,
                                      ready=lambda: handler.ready(res))
        headers = self.operation_headers(res.op, handler.namespace, self._location_of(res),
                                         status_monitor="Azure-AsyncOperation" in handler.create_headers,
                                         location_header="Location" in handler.create_headers)
        return Response(handler.create_status if existing is None else 200,
                        handler.view(res, query) if handler.create_body else None, headers)

    def _patch(self, handler: ResourceType, res: Resource, body: dict, query) -> Response:
        if "tags" in body:
            res.doc["tags"] = check_tags(body["tags"])
        handler.patch(res, body.get("properties") or {})
        if handler.namespace == "Microsoft.Network":  # network's updateTags is synchronous
            return Response(200, handler.view(res, query))
        op = self.start_operation(f"{handler.type.split('/')[-1]}/update", lambda: None)
        return Response(200, handler.view(res, query),
                        self.operation_headers(op, handler.namespace, self._location_of(res), location_header=False))

    def _delete(self, handler: ResourceType, res: Resource) -> Response:
        if handler.synchronous_delete:
            handler.check_delete(res)
            self.remove(res)
            return Response(200)
        if res.op and not res.op.done and res.op.kind.endswith("/delete"):
            op = res.op
        else:
            handler.check_delete(res)
            state = res.properties.get("provisioningState")
            res.properties["provisioningState"] = "Deleting"
            op = self.start_operation(f"{handler.type.split('/')[-1]}/delete", lambda: self.remove(res),
                                      on_failure=lambda: res.properties.update(provisioningState=state))
            res.op = op
        return Response(202, None, self.operation_headers(op, handler.namespace, self._location_of(res)))

    def remove(self, res: Resource) -> None:
        """Delete a resource and everything inside it, children first."""
        prefix = res.id.lower() + "/"
        for key in sorted((k for k in self._resources if k.startswith(prefix)), key=len, reverse=True):
            self.remove(self._resources[key])
        if self._resources.pop(res.id.lower(), None) is not None:
            self._types[res.type.lower()].delete(res)

    def _location_of(self, res: Resource) -> str:
        top = res.id.split("/")[:9]  # /subscriptions/s/resourceGroups/g/providers/ns/type/name
        owner = self._resources.get("/".join(top).lower())
        return norm_location((owner or res).doc.get("location") or "westus2")


def _initial_retry_after(op: Operation) -> str:
    """Whole seconds: some SDK operations parse the first response's Retry-After as an int (pollers
    poll once at once, then honour the poll responses' Retry-After, which may be a fraction)."""
    return str(int(op.latency.retry_after))


def _tag_filter(expression: str | None):
    """The two $filter forms resource group listing supports: tagName eq 'x' [and tagValue eq 'y']."""
    if not expression:
        return lambda tags: True
    m = re.fullmatch(r"\s*tagName eq '([^']*)'(?:\s+and\s+tagValue eq '([^']*)')?\s*", expression, re.IGNORECASE)
    if not m:
        raise ArmError(400, "InvalidFilterInQueryString", f"Invalid $filter '{expression}': the ARM test double "
                       "supports tagName eq '<name>' [and tagValue eq '<value>'].")
    name, value = m.groups()
    return lambda tags: any(k.lower() == name.lower() and (value is None or v == value) for k, v in tags.items())


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, handler, double: ArmDouble, context: ssl.SSLContext):
        super().__init__(address, handler)
        self.double = double
        # The TLS handshake happens in the request's thread, not in the accept loop.
        self.socket = context.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    def process_request(self, request, client_address):
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Idle keep-alive connections would otherwise keep their threads reading forever."""
        with self._open_lock:
            for request in self._open:
                try:
                    request.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Azure's front doors speak
    server: _Server

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw_body = self.rfile.read(length) if length else b""
        try:
            response = self.server.double.handle(self.command, self.path, self.headers, raw_body)
        except _Drop:
            self.close_connection = True
            return
        body = response.body
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        self.send_response(response.status)
        self.send_header("x-ms-request-id", new_guid())
        self.send_header("x-ms-correlation-request-id",
                         self.headers.get("x-ms-client-request-id") or new_guid())
        if body is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_PATCH = do_DELETE = do_HEAD = _dispatch

    def log_message(self, format, *args):  # the double's calls are in ArmDouble.calls instead
        pass

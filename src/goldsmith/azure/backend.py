"""The azure backend: AIB's build process on Azure Resource Manager.

A build's resources live in its staging resource group (`IT_<rg>_<template>_<guid>`, or the template's
`stagingResourceGroup`), under fixed names, so each step — in any process, on any try — finds what earlier
steps and tries made. Long operations are started, then handed to the caller as `Pending` (a plain-JSON wait
the operator waits on); the step is called again when they end and continues from what exists. A few things ARM can't hold live
in a local staging directory `$GOLDSMITH_HOME/staging/<group>/`: the Linux build VM's ephemeral SSH key (a
worker without it installs a new one through Run Command).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import secrets
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from functools import cached_property
from typing import Any, Iterator

from azure.core.exceptions import HttpResponseError, ResourceNotFoundError, ServiceRequestError, ServiceResponseError
from azure.storage.blob import BlobClient, BlobServiceClient, ContentSettings

from goldsmith import buildsbom, customizers, runoutputs, sbom, versions
from goldsmith.azure import arm, windows
from goldsmith.azure.arm import ResourceId, Wait
from goldsmith.azure.hooks import AzureBuildHook, AzureSettingsError
from goldsmith.core import Build, BuildError, Pending, destination_resource_group
from goldsmith.communicator import CommunicatorError, SSHCommunicator, create_build_key
from goldsmith.settings import goldsmith_home
from goldsmith.template.plan import Step

BUILD_USER = "goldsmith"
SSH_READY_TIMEOUT = 600
REBOOT_GRACE = 120  # seconds a VM that dropped the connection may take to go down
EXPIRY_SLACK = timedelta(hours=2)  # after the build timeout, before the janitor may delete the staging group
KEEP_FOR_DEBUGGING = timedelta(hours=24)  # errorHandling abort: how long the janitor leaves a kept VM alone
EGRESS_IP_URL = "https://api.ipify.org"
VHD_SAS_SECONDS = 4 * 3600
RUN_COMMAND_TIMEOUT = 90 * 60  # Azure's limit for one Run Command

# What a build creates in its staging group.
VNET, SUBNET, NSG, PIP, NIC, VM, OS_DISK, IMAGE = (
    "goldsmith-vnet", "build", "goldsmith-nsg", "goldsmith-pip", "goldsmith-nic", "goldsmith-vm", "goldsmith-osdisk",
    "goldsmith-image")
T_VNET, T_NSG, T_PIP, T_NIC = (f"Microsoft.Network/{t}" for t in (
    "virtualNetworks", "networkSecurityGroups", "publicIPAddresses", "networkInterfaces"))
T_VM, T_DISK, T_IMAGE, T_STORAGE = ("Microsoft.Compute/virtualMachines", "Microsoft.Compute/disks",
                                    "Microsoft.Compute/images", "Microsoft.Storage/storageAccounts")
# Cleanup of a group goldsmith did not create: what depends on what goes first.
DELETE_ORDER = ([(T_VM, VM)], [(T_NIC, NIC), (T_IMAGE, IMAGE), (T_DISK, OS_DISK)],
                [(T_PIP, PIP), (T_NSG, NSG), (T_VNET, VNET)])

TAG_CREATED_BY, TAG_DAG, TAG_RUN, TAG_TEMPLATE, TAG_EXPIRY, TAG_KEEP, TAG_DEPROVISIONED = (
    "createdBy", "goldsmith.dagId", "goldsmith.runId", "goldsmith.template", "goldsmith.expiry", "goldsmith.keep",
    "goldsmith.deprovisioned")


# NSG source prefixes that mean "anyone": refused for the build VM's SSH rule.
OPEN_TO_ALL = frozenset({"*", "0.0.0.0/0", "::/0", "internet", "any", "0.0.0.0"})

class AzureBackend:
    def __init__(self, build: Build):
        self.build = build
        self.plan = build.plan
        self.props = build.plan.template.properties
        self.log = build.log
        self.hook = AzureBuildHook(build.plan.options.azureConnectionId)
        self.local = goldsmith_home() / "staging" / build.staging_name

    # --- where things are ----------------------------------------------------------------------------------

    @cached_property
    def arm(self) -> arm.ArmClients:
        try:
            return self.hook.clients()
        except AzureSettingsError as e:
            raise BuildError(str(e)) from None

    @property
    def subscription(self) -> str:
        return self.hook.settings.subscription_id

    @cached_property
    def location(self) -> str:
        location = self.plan.template.location
        if not location:
            raise BuildError("location: the azure backend builds in the template's region; set \"location\" "
                             "(e.g. \"westeurope\") at the top of the template")
        return location.replace(" ", "").lower()

    @cached_property
    def group(self) -> ResourceId:
        """The staging resource group."""
        if self.props.stagingResourceGroup:
            try:
                given = ResourceId.parse(self.props.stagingResourceGroup, field="stagingResourceGroup")
            except ValueError as e:
                raise BuildError(str(e)) from None
            if given.namespace or given.subscription.lower() != self.subscription.lower():
                raise BuildError(
                    f"stagingResourceGroup: '{self.props.stagingResourceGroup}' must be a resource group id in the "
                    f"connection's subscription {self.subscription} (/subscriptions/<id>/resourceGroups/<name>)")
            return given
        return ResourceId(self.subscription, self.build.staging_name)

    def _id(self, type_: str, *names: str) -> ResourceId:
        return arm.resource_id(self.group.subscription, self.group.resource_group, type_, *names)

    @property
    def rg(self) -> str:
        return self.group.resource_group

    # --- errors and waiting --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def arm_errors(self, what: str) -> Iterator[None]:
        """ARM's refusals become BuildErrors naming the step; throttling, conflicts and server errors that
        outlived azure-core's retries stay retryable (the task's retry continues from what exists)."""
        try:
            yield
        except HttpResponseError as e:
            if arm.is_transient(e):
                raise RuntimeError(f"{what}: {arm.error_message(e)} (transient: the task retries)") from None
            raise BuildError(f"{what}: {arm.error_message(e)}") from None
        except (ServiceRequestError, ServiceResponseError) as e:
            raise RuntimeError(f"{what}: ARM did not answer ({e}); the task retries") from None

    def _pending(self, what: str, waits: list[Wait]) -> Pending:
        self.log.info("waiting for %s", what)
        return Pending(what, {"trigger": "arm", "conn_id": self.hook.conn_id, "waits": [w.to_json() for w in waits],
                              "poll_interval": self.hook.settings.poll_interval})

    def _wait_for(self, what: str, waits: list[Wait | None]) -> None:
        """Raise Pending for the waits that are not over yet (None: that one is)."""
        waits = [w for w in waits if w]
        if waits:
            raise self._pending(what, waits)

    def _ensure(self, type_: str, name: str, label: str, body: Any) -> Wait | None:
        """PUT a resource unless it exists; None once it is provisioned, else a Wait for it. A resource left
        Failed by an earlier try is submitted again (a PUT retries a failed provisioning, as in ARM)."""
        rid = self._id(type_, name)
        resource = arm.get(self.arm, rid)
        state = arm.provisioning_state(resource)
        if state == "Succeeded":
            return None
        if resource is not None and state != "Failed":
            self.log.info("%s is %s: waiting for it (an earlier try started it)", label, state)
            return Wait("provisioned", str(rid), label)
        if state == "Failed":
            self.log.warning("%s is Failed after an earlier try: submitting it again", label)
        operation = arm.submit(self._creator(type_), self.rg, name, body() if callable(body) else body)
        return Wait("provisioned", str(rid), label, operation)

    def _creator(self, type_: str) -> Any:
        c = self.arm
        return {
            T_VNET: c.network.virtual_networks.begin_create_or_update,
            T_NSG: c.network.network_security_groups.begin_create_or_update,
            T_PIP: c.network.public_ip_addresses.begin_create_or_update,
            T_NIC: c.network.network_interfaces.begin_create_or_update,
            T_VM: c.compute.virtual_machines.begin_create_or_update,
            T_IMAGE: c.compute.images.begin_create_or_update,
            T_STORAGE: c.storage.storage_accounts.begin_create,
        }[type_]

    def _tags(self, **extra: str) -> dict[str, str]:
        return {**(self.props.managedResourceTags or {}), TAG_CREATED_BY: "goldsmith", TAG_TEMPLATE: self.plan.name,
                TAG_DAG: self.build.dag_id, TAG_RUN: self.build.run_id, **extra}

    def _ours(self, tags: dict[str, str] | None) -> bool:
        tags = tags or {}
        return tags.get(TAG_DAG) == self.build.dag_id and tags.get(TAG_RUN) == self.build.run_id

    # --- plan ----------------------------------------------------------------------------------------------

    def resolve_source(self) -> dict[str, Any]:
        source = self.props.source
        with self.arm_errors("source"):
            if source.type == "PlatformImage":
                resolved = self._platform_image(source)
            elif source.type == "ManagedImage":
                resolved = self._managed_image(source.imageId)
            else:
                resolved = self._gallery_version(source.imageVersionId)
        self._check_os(resolved["osType"])
        return resolved

    def _platform_image(self, s: Any) -> dict[str, Any]:
        missing = [f for f in ("publisher", "offer", "sku") if not getattr(s, f)]
        if missing:
            raise BuildError(f"source: a PlatformImage needs {', '.join(missing)} (e.g. \"publisher\": "
                             "\"Canonical\", \"offer\": \"ubuntu-24_04-lts\", \"sku\": \"server\")")
        images = self.arm.compute.virtual_machine_images
        version = s.version or "latest"
        urn = f"{s.publisher}:{s.offer}:{s.sku}"
        if version.lower() == "latest":
            try:
                listed = [i.as_dict()["name"] for i in images.list(self.location, s.publisher, s.offer, s.sku)]
            except ResourceNotFoundError:
                listed = []
            if not listed:
                raise BuildError(f"source: no versions of {urn} in {self.location}; check publisher, offer and sku "
                                 f"(az vm image list --location {self.location} --publisher {s.publisher} --all)")
            version = versions.highest(listed)
        try:
            image = images.get(self.location, s.publisher, s.offer, s.sku, version).as_dict()["properties"]
        except ResourceNotFoundError:
            raise BuildError(f"source: version '{version}' of {urn} is not in {self.location}; use 'latest' or an "
                             "existing version") from None
        plan = image.get("plan")
        if plan and not s.planInfo:
            raise BuildError(
                f"source.planInfo: {urn} is a marketplace image with a purchase plan; add \"planInfo\": "
                f"{{\"planName\": \"{plan.get('name')}\", \"planProduct\": \"{plan.get('product')}\", "
                f"\"planPublisher\": \"{plan.get('publisher')}\"}} (and accept its terms: az vm image terms accept)")
        return {"type": s.type, "id": f"{urn}:{version}", "exactVersion": version, "parents": [],
                "osType": image.get("osDiskImage", {}).get("operatingSystem", "Linux"),
                "hyperVGeneration": image.get("hyperVGeneration") or "V1",
                "imageReference": {"publisher": s.publisher, "offer": s.offer, "sku": s.sku, "version": version}}

    def _managed_image(self, image_id: str) -> dict[str, Any]:
        rid = self._parse(image_id, "source.imageId", "Microsoft.Compute/images")
        image = arm.get(self.hook.clients(rid.subscription), rid)
        if image is None:
            raise BuildError(f"source.imageId: managed image '{image_id}' does not exist")
        if image["location"].replace(" ", "").lower() != self.location:
            raise BuildError(f"source.imageId: the image is in {image['location']}, the build in {self.location}; "
                             "AIB needs the source image in the template's region")
        os_disk = image["properties"]["storageProfile"]["osDisk"]
        if os_disk.get("osState") != "Generalized":
            raise BuildError(f"source.imageId: '{image_id}' is not generalized; only generalized images are sources")
        return {"type": "ManagedImage", "id": image["id"], "exactVersion": None, "parents": [image["id"]],
                "osType": os_disk.get("osType", "Linux"),
                "hyperVGeneration": image["properties"].get("hyperVGeneration") or "V1",
                "imageReference": {"id": image["id"]}}

    def _gallery_version(self, version_id: str) -> dict[str, Any]:
        rid = self._parse(version_id, "source.imageVersionId", "Microsoft.Compute/galleries/images/versions")
        clients = self.hook.clients(rid.subscription)
        definition_id = ResourceId(rid.subscription, rid.resource_group, rid.namespace, rid.types[:2], rid.names[:2])
        definition = arm.get(clients, definition_id)
        if definition is None:
            raise BuildError(f"source.imageVersionId: image definition '{definition_id}' does not exist")
        if rid.name.lower() == "latest":
            listed = [v.as_dict() for v in clients.compute.gallery_image_versions.list_by_gallery_image(
                rid.resource_group, *rid.names[:2])]
            usable = [v for v in listed if arm.provisioning_state(v) == "Succeeded"
                      and not v["properties"].get("publishingProfile", {}).get("excludeFromLatest")
                      and self._replicated_here(v)]
            if not usable:
                raise BuildError(f"source.imageVersionId: '{definition_id}' has no version usable as latest in "
                                 f"{self.location} (succeeded, not excludeFromLatest, replicated there)")
            version = max(usable, key=lambda v: versions.key(v["name"]))
        else:
            version = arm.get(clients, rid)
            if version is None:
                raise BuildError(f"source.imageVersionId: image version '{version_id}' does not exist")
            if not self._replicated_here(version):
                raise BuildError(f"source.imageVersionId: '{version_id}' is not replicated to {self.location}; "
                                 "add the region to its targetRegions")
        props = definition["properties"]
        if props.get("osState", "Generalized") != "Generalized":
            raise BuildError(f"source.imageVersionId: '{definition_id}' is specialized; only generalized images "
                             "are sources")
        return {"type": "SharedImageVersion", "id": version["id"], "exactVersion": version["name"],
                "parents": [version["id"]], "osType": props.get("osType", "Linux"),
                "hyperVGeneration": props.get("hyperVGeneration") or "V1", "imageReference": {"id": version["id"]}}

    def _replicated_here(self, version: dict[str, Any]) -> bool:
        regions = version["properties"].get("publishingProfile", {}).get("targetRegions") or []
        return any(r["name"].replace(" ", "").lower() == self.location for r in regions) or not regions

    def _parse(self, value: str, field: str, type_: str) -> ResourceId:
        try:
            rid = ResourceId.parse(value, field=field)
        except ValueError as e:
            raise BuildError(str(e)) from None
        if rid.type.lower() != type_.lower():
            raise BuildError(f"{field}: '{value}' is a {rid.type} id; expected a {type_} id")
        return rid

    def _check_os(self, os_type: str) -> None:
        """Customizers must suit the source's OS: found at plan time, before any VM starts."""
        linux_only, windows_only = ("Shell",), ("PowerShell", "WindowsRestart", "WindowsUpdate")
        items = [(f"properties.customize[{i}]", c.type) for i, c in enumerate(self.props.customize)]
        if self.props.validate_:
            items += [(f"properties.validate.inVMValidations[{i}]", v.type)
                      for i, v in enumerate(self.props.validate_.inVMValidations)]
        wrong = windows_only if os_type == "Linux" else linux_only
        problems = [f"{path}: '{kind}' does not run on a {os_type} source image"
                    for path, kind in items if kind in wrong]
        if problems:
            fix = "Shell customizers for Linux" if os_type == "Linux" else "PowerShell customizers for Windows"
            raise BuildError("; ".join(problems) + f"; use {fix}")

    # --- staging -------------------------------------------------------------------------------------------

    def prepare_staging(self) -> dict[str, Any]:
        expiry = datetime.now(timezone.utc) + timedelta(minutes=self.plan.build_timeout_minutes) + EXPIRY_SLACK
        run_tags = {TAG_DAG: self.build.dag_id, TAG_RUN: self.build.run_id, TAG_TEMPLATE: self.plan.name,
                    TAG_EXPIRY: expiry.isoformat(timespec="seconds"), "imageTemplateName": self.plan.name}
        groups = self.arm.resources.resource_groups
        with self.arm_errors("prepare_staging"):
            existing = arm.get(self.arm, self.group)
            if existing is None:
                tags = {**self._tags(), **run_tags}
                rg_of_template = destination_resource_group(self.plan)
                if rg_of_template:
                    tags["imageTemplateResourceGroupName"] = rg_of_template
                groups.create_or_update(self.rg, {"location": self.location, "tags": tags})
                self.log.info("created staging resource group %s in %s", self.group, self.location)
                created = True
            elif self._ours(existing.get("tags")):
                self.log.info("adopting staging resource group %s from an earlier try", self.group)
                created = existing["tags"].get(TAG_CREATED_BY) == "goldsmith"
            elif not self.props.stagingResourceGroup:
                raise BuildError(f"staging resource group {self.group} exists and was not created by this run; "
                                 "delete it or run the DAG again (a new run gets a new name)")
            else:
                self._adopt_given_group(existing)
                groups.update(self.rg, {"tags": {**(existing.get("tags") or {}), "usedBy": "goldsmith",
                                                 **(self.props.managedResourceTags or {}), **run_tags}})
                self.log.info("using the empty resource group %s as staging (only what the build creates in it "
                              "is deleted)", self.group)
                created = False
        self.local.mkdir(parents=True, exist_ok=True)
        return {"stagingResourceGroup": str(self.group), "created": created}

    def _adopt_given_group(self, existing: dict[str, Any]) -> None:
        """AIB's rules for an existing stagingResourceGroup: same region, no other template, empty."""
        if existing["location"].replace(" ", "").lower() != self.location:
            raise BuildError(f"stagingResourceGroup: {self.group} is in {existing['location']}, the build in "
                             f"{self.location}; use a group in the template's region")
        tags = existing.get("tags") or {}
        other = tags.get("imageTemplateName") or tags.get(TAG_TEMPLATE)
        if other and other != self.plan.name:
            raise BuildError(f"stagingResourceGroup: {self.group} is used by image template '{other}'; each template "
                             "needs its own staging group")
        inside = [r.as_dict()["id"] for r in self.arm.resources.resources.list_by_resource_group(self.rg)]
        if inside:
            raise BuildError(f"stagingResourceGroup: {self.group} must be empty, as AIB requires; it holds "
                             f"{len(inside)} resource(s), e.g. {inside[0]}")

    def _require_staging(self) -> None:
        if arm.get(self.arm, self.group) is None:
            raise BuildError(f"staging resource group {self.group} does not exist: prepare_staging must run first")

    # --- the build VM --------------------------------------------------------------------------------------

    def provision(self, source: dict[str, Any]) -> dict[str, Any]:
        with self.arm_errors("provision"):
            self._require_staging()
            state = arm.provisioning_state(arm.get(self.arm, self._id(T_VM, VM)))
            if state != "Succeeded":
                if state in (None, "Failed"):  # the network is needed only to create the VM
                    self._wait_for("network resources", self._network(source["osType"] == "Windows"))
                    self._wait_for("network interface", [self._ensure(T_NIC, NIC, "network interface", self._nic_body)])
                    self.log.info("creating build VM %s (%s) from %s", VM, self._vm_size(source), source["id"])
                self._wait_for("build VM", [self._ensure(T_VM, VM, "build VM", lambda: self._vm_body(source))])
            self._tag_os_disk()
            address = self._address()
        if source["osType"] == "Linux":
            started = time.monotonic()
            with self._connect(address):
                pass
            self.log.info("build VM ready: ssh %s@%s after %.0f s", BUILD_USER, address, time.monotonic() - started)
        return {"vm": str(self._id(T_VM, VM)), "address": address, "osType": source["osType"]}

    def _tag_os_disk(self) -> None:
        """ARM creates the OS disk with the VM, untagged: tag it, so that cleanup knows it is this run's."""
        disk = arm.get(self.arm, self._id(T_DISK, OS_DISK)) or {}
        if disk and not self._ours(disk.get("tags")):
            self.arm.compute.disks.begin_update(self.rg, OS_DISK, {"tags": self._tags()}).result()

    def _network(self, windows_vm: bool) -> list[Wait | None]:
        if self._subnet_id:
            return []
        return [
            self._ensure(T_VNET, VNET, "virtual network", {
                "location": self.location, "tags": self._tags(),
                "properties": {"addressSpace": {"addressPrefixes": ["10.0.0.0/24"]},
                               "subnets": [{"name": SUBNET, "properties": {"addressPrefix": "10.0.0.0/24"}}]}}),
            self._ensure(T_NSG, NSG, "network security group", lambda: self._nsg_body(windows_vm)),
            self._ensure(T_PIP, PIP, "public IP address", {
                "location": self.location, "tags": self._tags(), "sku": {"name": "Standard"},
                "properties": {"publicIPAllocationMethod": "Static", "publicIPAddressVersion": "IPv4"}}),
        ]

    @property
    def _subnet_id(self) -> str | None:
        profile = self.props.vmProfile
        return profile.vnetConfig.subnetId if profile and profile.vnetConfig else None

    def _nsg_body(self, windows_vm: bool) -> dict[str, Any]:
        # Windows builds are driven through Run Command: nothing needs to reach them.
        rules = [] if windows_vm else [{"name": "goldsmith-ssh", "properties": {
            "priority": 1000, "direction": "Inbound", "access": "Allow", "protocol": "Tcp",
            "sourceAddressPrefix": self._ssh_source(), "sourcePortRange": "*",
            "destinationAddressPrefix": "*", "destinationPortRange": "22"}}]
        return {"location": self.location, "tags": self._tags(), "properties": {"securityRules": rules}}

    def _ssh_source(self) -> str:
        configured = self.hook.settings.ssh_source
        if configured.strip().lower() in OPEN_TO_ALL:
            raise BuildError(
                f"provision: extra 'goldsmith_ssh_source' of connection '{self.hook.conn_id}' is '{configured}', "
                "which opens the build VM's SSH to the whole Internet: set the CIDR the worker's SSH comes from "
                "(e.g. 203.0.113.7/32), or 'auto'")
        if configured != "auto":
            return configured
        try:
            with urllib.request.urlopen(EGRESS_IP_URL, timeout=10) as response:  # noqa: S310 - fixed https URL
                address = response.read().decode().strip()
        except OSError as e:
            raise BuildError(
                f"provision: could not learn this worker's egress address from {EGRESS_IP_URL} ({e}); set extra "
                f"'goldsmith_ssh_source' of connection '{self.hook.conn_id}' to the CIDR the build VM sees SSH "
                "coming from (e.g. 203.0.113.7/32)") from None
        return f"{address}/32"

    def _nic_body(self) -> dict[str, Any]:
        ip = {"privateIPAllocationMethod": "Dynamic",
              "subnet": {"id": self._subnet_id or f"{self._id(T_VNET, VNET)}/subnets/{SUBNET}"}}
        body: dict[str, Any] = {"location": self.location, "tags": self._tags(),
                                "properties": {"ipConfigurations": [{"name": "ipconfig", "properties": ip}]}}
        if not self._subnet_id:  # with an existing subnet: no public IP and the subnet's own rules, as AIB does
            ip["publicIPAddress"] = {"id": str(self._id(T_PIP, PIP))}
            body["properties"]["networkSecurityGroup"] = {"id": str(self._id(T_NSG, NSG))}
        return body

    def _vm_size(self, source: dict[str, Any]) -> str:
        profile = self.props.vmProfile
        if profile and profile.vmSize:
            return profile.vmSize
        return "Standard_D2ds_v4" if source.get("hyperVGeneration") == "V2" else "Standard_D1_v2"

    def _vm_body(self, source: dict[str, Any]) -> dict[str, Any]:
        profile = self.props.vmProfile
        # OS disk and NIC stay when the VM goes: cleanup deletes them by name, the VHD step reads the disk.
        os_disk: dict[str, Any] = {"name": OS_DISK, "createOption": "FromImage",
                                   "managedDisk": {"storageAccountType": "Standard_LRS"}}
        if profile and profile.osDiskSizeGB:
            os_disk["diskSizeGB"] = profile.osDiskSizeGB
        computer = f"gs{self.build.guid.replace('-', '')[:13]}"  # Windows: at most 15 characters
        if source["osType"] == "Windows":
            # Run Command needs no login: the password is only there because Azure requires one.
            os_profile = {"computerName": computer, "adminUsername": BUILD_USER,
                          "adminPassword": secrets.token_urlsafe(24) + "Aa1!",
                          "windowsConfiguration": {"provisionVMAgent": True, "enableAutomaticUpdates": False}}
        else:
            os_profile = {"computerName": computer, "adminUsername": BUILD_USER, "linuxConfiguration": {
                "disablePasswordAuthentication": True, "ssh": {"publicKeys": [
                    {"path": f"/home/{BUILD_USER}/.ssh/authorized_keys", "keyData": self._ensure_key()}]}}}
        body: dict[str, Any] = {
            "location": self.location, "tags": self._tags(),
            "properties": {
                "hardwareProfile": {"vmSize": self._vm_size(source)},
                "storageProfile": {"imageReference": source["imageReference"], "osDisk": os_disk, "dataDisks": [
                    {"lun": i, "createOption": "Empty", "diskSizeGB": d.sizeGB, "deleteOption": "Delete"}
                    for i, d in enumerate(self.props.additionalDataDisks or []) if d.sizeGB]},
                "osProfile": os_profile,
                "networkProfile": {"networkInterfaces": [{"id": str(self._id(T_NIC, NIC)),
                                                          "properties": {"primary": True}}]},
            },
        }
        if profile and profile.userAssignedIdentities:
            body["identity"] = {"type": "UserAssigned",
                                "userAssignedIdentities": {i: {} for i in profile.userAssignedIdentities}}
        plan = getattr(self.props.source, "planInfo", None)
        if plan:
            body["plan"] = {"name": plan.planName, "product": plan.planProduct, "publisher": plan.planPublisher}
        return body

    def _address(self) -> str:
        """Where the worker reaches the VM: its public IP, or its private IP in the template's subnet."""
        if not self._subnet_id:
            pip = arm.get(self.arm, self._id(T_PIP, PIP)) or {}
            address = pip.get("properties", {}).get("ipAddress")
        else:
            nic = arm.get(self.arm, self._id(T_NIC, NIC)) or {}
            configs = nic.get("properties", {}).get("ipConfigurations") or [{}]
            address = configs[0].get("properties", {}).get("privateIPAddress")
        if not address:
            raise RuntimeError("the build VM has no IP address yet")
        return address

    @cached_property
    def _vm(self) -> dict[str, Any]:
        vm = arm.get(self.arm, self._id(T_VM, VM))
        if vm is None:
            raise BuildError(f"no build VM in {self.group}: provision must run first")
        return vm

    @property
    def _windows(self) -> bool:
        return "windowsConfiguration" in self._vm["properties"].get("osProfile", {})

    # --- SSH (Linux) ---------------------------------------------------------------------------------------

    def _ensure_key(self) -> str:
        """The public half of an ed25519 key made for this build only."""
        key = self.local / "id_ed25519"
        self.local.mkdir(parents=True, exist_ok=True)
        create_build_key(key)
        return key.with_suffix(".pub").read_text().strip()

    def _connect(self, address: str | None = None) -> SSHCommunicator:
        key = self.local / "id_ed25519"
        if not key.exists() or key.with_suffix(".installing").exists():
            self._install_new_key()
        comm = SSHCommunicator(address or self._address(), 22, BUILD_USER, key)
        try:
            comm.wait_until_ready(SSH_READY_TIMEOUT)
        except CommunicatorError as e:
            comm.close()
            raise RuntimeError(f"build VM did not answer on SSH: {e}; boot diagnostics: az vm boot-diagnostics "
                               f"get-boot-log -g {self.rg} -n {VM}") from e
        return comm

    def _install_new_key(self) -> None:
        """This worker lacks the key another worker made: make one and add it to the VM through Run Command
        (`.installing` marks a key made here but not yet on the VM)."""
        marker = self.local / "id_ed25519.installing"
        if not (self.local / "id_ed25519").exists():
            self.log.warning("no SSH key for this build in %s (another worker made it): installing a new one",
                             self.local)
            self.local.mkdir(parents=True, exist_ok=True)
            marker.touch()
        public = self._ensure_key()
        key = f"ssh-key/{hashlib.sha256(public.encode()).hexdigest()[:12]}"
        result = self._run_command(key, f"echo '{public}' >> /home/{BUILD_USER}/.ssh/authorized_keys")
        self._delete_run_commands(key)
        if result["exitCode"] != 0:
            raise RuntimeError(f"could not install a new SSH key on the build VM:\n{windows.tail(result)}")
        marker.unlink()

    def _on_line(self, line: str) -> None:
        self.log.info("%s", line)

    def _boot_id(self, comm: SSHCommunicator) -> str:
        result = comm.run("cat /proc/sys/kernel/random/boot_id")
        return "\n".join(result.tail).strip()

    def _wait_out_reboot(self, boot_id: str) -> None:
        """The script dropped the connection, as a reboot does: wait until the VM answers with a new boot id; if
        it still answers with the old one after REBOOT_GRACE seconds, it did not reboot."""
        self.log.info("the customizer dropped the connection (a reboot): waiting for the VM to come back")
        started = time.monotonic()
        while True:
            time.sleep(10)
            with self._connect() as comm:  # waits for the VM to answer again
                if self._boot_id(comm) != boot_id:
                    return
            if time.monotonic() - started > REBOOT_GRACE:
                self.log.info("the VM answers with the same boot id: it did not reboot")
                return

    # --- customize and validate ----------------------------------------------------------------------------

    def customize(self, step: Step) -> dict[str, Any]:
        c = step.item
        with self.arm_errors(step.task_id):
            if self._windows:
                return self._windows_step(step, validator=False)
        try:
            with self._connect() as comm:
                boot_id = self._boot_id(comm) if c.type == "Shell" else None  # to tell a reboot happened
                if customizers.run_linux_customizer(comm, c, name=step.name, on_line=self._on_line,
                                                 secrets=self.build.secrets):
                    self._wait_out_reboot(boot_id)
        except customizers.CustomizerError as e:
            raise BuildError(f"{step.task_id}: {e}") from None
        return {"step": step.task_id}

    def validate(self, step: Step) -> dict[str, Any]:
        v = step.item
        with self.arm_errors(step.task_id):
            if self._windows:
                return self._windows_step(step, validator=True)
        try:
            with self._connect() as comm:
                customizers.run_linux_validator(comm, v, name=step.name, on_line=self._on_line,
                                                secrets=self.build.secrets)
        except customizers.CustomizerError as e:
            raise BuildError(f"{step.task_id}: validation failed: {e}") from None
        return {"step": step.task_id, "passed": True}

    # --- Windows, through Run Command ----------------------------------------------------------------------

    def _windows_step(self, step: Step, *, validator: bool) -> dict[str, Any]:
        """Each script of the step is a Run Command named after the step and its part: a step called again (after
        a wait, or on a retry) skips the parts that ran. They are deleted when the step ends, so a retry after a
        failure runs them again."""
        try:
            windows.run_customizer(step.item, step.task_id, step.name, self._run_command, self.log)
        except (BuildError, customizers.CustomizerError) as e:
            self._delete_run_commands(step.task_id)
            raise BuildError(f"{step.task_id}: {'validation failed: ' if validator else ''}{e}") from None
        self._delete_run_commands(step.task_id)
        return {"step": step.task_id, **({"passed": True} if validator else {})}

    def _run_command(self, key: str, script: str) -> dict[str, Any]:
        """Runs a script once per key as a managed Run Command (a resource named after the key, so a step called
        again, or a retry after a lost worker, finds it); returns its instance view (exitCode, output, error)
        once it ran, raises Pending while it runs."""
        name = _run_command_name(key)
        rid = self._id(T_VM, VM).child("runCommands", name)
        found = arm.get(self.arm, rid)
        view = ((found or {}).get("properties") or {}).get("instanceView") or {}
        if found is None:
            operation = arm.submit(self.arm.compute.virtual_machine_run_commands.begin_create_or_update, self.rg, VM,
                                   name, {"location": self.location, "tags": self._tags(), "properties": {
                                       "source": {"script": script}, "asyncExecution": False,
                                       "timeoutInSeconds": RUN_COMMAND_TIMEOUT,
                                       "treatFailureAsDeploymentFailure": False}})
            raise self._pending(f"Run Command {name}",
                                [Wait("run_command", str(rid), f"Run Command {name}", operation)])
        if view.get("executionState") not in arm.TERMINAL_RUN_COMMAND_STATES:
            raise self._pending(f"Run Command {name} (started earlier)", [Wait("run_command", str(rid), name)])
        return {"exitCode": view.get("exitCode"), "output": view.get("output") or "", "error": view.get("error") or "",
                "executionState": view["executionState"]}

    def _log_output(self, result: dict[str, Any]) -> None:
        for line in (result["output"] + "\n" + result["error"]).strip().splitlines():
            self.log.info("%s", line)

    def _delete_run_commands(self, key: str) -> None:
        """A step's Run Commands go when it ends, so that a retry runs them again."""
        prefix = _run_command_name(key)
        for command in self.arm.compute.virtual_machine_run_commands.list_by_virtual_machine(self.rg, VM):
            name = command.as_dict()["name"]
            if name == prefix or name.startswith(prefix + "-"):
                self.arm.compute.virtual_machine_run_commands.begin_delete(self.rg, VM, name).result()

    # --- generalize and capture ----------------------------------------------------------------------------

    def generalize(self) -> dict[str, Any]:
        with self.arm_errors("generalize"):
            power, generalized = self._vm_states()
            if generalized:
                self.log.info("already generalized by an earlier try")
                return {"generalized": True}
            deprovisioned = (self._vm.get("tags") or {}).get(TAG_DEPROVISIONED) == "true"
            if power == "running" and not deprovisioned:
                buildsbom.record(self.build, self._inventory)  # what the image holds, before generalizing
                if self._windows:
                    result = self._run_command("generalize/sysprep", windows.SYSPREP)
                    if result["exitCode"] != 0:
                        self._delete_run_commands("generalize")
                        raise BuildError(f"generalize: sysprep failed:\n{windows.tail(result)}")
                else:
                    self._deprovision_linux()
                # The build user is gone now: a retry must not try to log in and deprovision again.
                self.arm.compute.virtual_machines.begin_update(self.rg, VM, {"tags": {
                    **(self._vm.get("tags") or {}), TAG_DEPROVISIONED: "true"}}).result()
            if power != "deallocated":
                operation = None if power == "deallocating" else arm.submit(
                    self.arm.compute.virtual_machines.begin_deallocate, self.rg, VM)
                raise self._pending("deallocation of the build VM", [
                    Wait("power", str(self._id(T_VM, VM)), "build VM", operation, state="deallocated")])
            self.arm.compute.virtual_machines.generalize(self.rg, VM)
        self.log.info("VM deprovisioned, deallocated and generalized")
        return {"generalized": True}

    def _inventory(self) -> sbom.Inventory:
        """The build VM's installed software: dpkg over SSH on Linux, programs and updates via Run Command on
        Windows."""
        if self._windows:
            result = self._run_command("generalize/sbom", sbom.WINDOWS_SCRIPT)
            if result["exitCode"] != 0:
                self._delete_run_commands("generalize")
                raise BuildError(f"generalize: listing the installed software failed:\n{windows.tail(result)}")
            return sbom.parse_windows(result["output"])
        with self._connect() as comm:
            return sbom.collect_linux(buildsbom.ssh_runner(comm))

    def _vm_states(self) -> tuple[str, bool]:
        view = self.arm.compute.virtual_machines.instance_view(self.rg, VM).as_dict()
        codes = [s.get("code", "") for s in view.get("statuses") or []]
        power = next((c.split("/", 1)[1] for c in codes if c.startswith("PowerState/")), "unknown")
        return power, "OSState/generalized" in codes

    def _deprovision_linux(self) -> None:
        try:
            with self._connect() as comm:
                customizers.deprovision(comm, on_line=self._on_line)
        except customizers.CustomizerError as e:
            raise BuildError(f"generalize: {e}") from None

    def capture(self) -> dict[str, Any]:
        with self.arm_errors("capture"):
            disk = arm.get(self.arm, self._id(T_DISK, OS_DISK)) or {}
            generation = disk.get("properties", {}).get("hyperVGeneration") or "V1"
            self._wait_for("image capture", [self._ensure(T_IMAGE, IMAGE, "captured image", {
                "location": self.location, "tags": self._tags(),
                "properties": {"sourceVirtualMachine": {"id": str(self._id(T_VM, VM))},
                               "hyperVGeneration": generation}})])
        return {"image": str(self._id(T_IMAGE, IMAGE))}

    # --- distribute ----------------------------------------------------------------------------------------

    def distribute(self, step: Step, source: dict[str, Any]) -> dict[str, Any]:
        d = step.item
        with self.arm_errors(step.task_id):
            if d.type == "ManagedImage":
                if d.location.replace(" ", "").lower() != self.location:
                    raise BuildError(
                        f"distribute.{d.runOutputName}.location: {d.location} differs from the build region "
                        f"{self.location}; Azure creates a managed image only in its source's region (use a "
                        "SharedImage target to publish to other regions)")
                disk = arm.get(self.arm, self._id(T_DISK, OS_DISK)) or {}
                artifact_id, artifact_uri = self.publish_managed_image(d, source, {
                    "sourceVirtualMachine": {"id": str(self._id(T_VM, VM))},
                    "hyperVGeneration": disk.get("properties", {}).get("hyperVGeneration") or "V1"}), None
            elif d.type == "SharedImage":
                artifact_id, artifact_uri = self.publish_gallery_version(
                    d, source, {"source": {"id": str(self._id(T_IMAGE, IMAGE))}}), None
            else:
                artifact_id, artifact_uri = None, self._distribute_vhd(d)
        return self.record_output(step, source, artifact_id, artifact_uri)

    def record_output(self, step: Step, source: dict[str, Any], artifact_id: str | None,
                      artifact_uri: str | None) -> dict[str, Any]:
        d = step.item
        bom = buildsbom.ref(self.build)  # the document is kept in the run's record, its digest on the artifact
        sbom_extra = {"sbom": bom} if bom else {}
        runoutputs.record(self.plan.name, self.build.run_id, d.runOutputName, artifactId=artifact_id,
                          artifactUri=artifact_uri, provisioningState="Succeeded",
                          extra={"digest": self.plan.digest,
                                 "source": {k: source.get(k) for k in ("type", "id", "exactVersion")}, **sbom_extra})
        self.log.info("%s: %s", step.task_id, artifact_id or artifact_uri)
        return {"runOutputName": d.runOutputName, "artifactId": artifact_id, "artifactUri": artifact_uri, **sbom_extra}

    def _artifact_tags(self, d: Any, source: dict[str, Any]) -> dict[str, str]:
        """artifactTags plus provenance, so the artifact says where it came from."""
        bom = buildsbom.ref(self.build) or {}
        return {**d.artifactTags, TAG_TEMPLATE: self.plan.name, "goldsmith.templateDigest": self.plan.digest,
                TAG_DAG: self.build.dag_id, TAG_RUN: self.build.run_id, "goldsmith.source": source.get("id") or "",
                "goldsmith.sourceVersion": source.get("exactVersion") or "",
                **({"goldsmith.sbom.sha256": bom["sha256"], "goldsmith.sbom.packages": str(bom["packages"])}
                   if bom else {})}

    def publish_managed_image(self, d: Any, source: dict[str, Any], properties: dict[str, Any]) -> str:
        """The ManagedImage target `d`, made with `properties` (its source); returns its id once it exists."""
        rid = self._parse(d.imageId, f"distribute.{d.runOutputName}.imageId", "Microsoft.Compute/images")
        clients = self.hook.clients(rid.subscription)
        if arm.get(clients, ResourceId(rid.subscription, rid.resource_group)) is None:
            raise BuildError(f"distribute.{d.runOutputName}.imageId: resource group {rid.resource_group} does not "
                             "exist; create it first, as AIB requires")
        image = arm.get(clients, rid)
        if image is not None and not self._ours(image.get("tags")):
            raise BuildError(f"distribute.{d.runOutputName}.imageId: managed image '{d.imageId}' already exists; "
                             "like AIB, Goldsmith doesn't overwrite managed images: delete it or choose a new imageId")
        state = arm.provisioning_state(image)
        if state == "Succeeded":
            return image["id"]
        if image is not None and state != "Failed":
            raise self._pending(f"managed image {rid.name}", [Wait("provisioned", str(rid), f"image {rid.name}")])
        operation = arm.submit(clients.compute.images.begin_create_or_update, rid.resource_group, rid.name, {
            "location": d.location.replace(" ", "").lower(), "tags": self._artifact_tags(d, source),
            "properties": properties})
        raise self._pending(f"managed image {rid.name}",
                            [Wait("provisioned", str(rid), f"image {rid.name}", operation)])

    def publish_gallery_version(self, d: Any, source: dict[str, Any], storage_profile: dict[str, Any]) -> str:
        """A version of the SharedImage target `d`'s definition, made from `storage_profile` (its source);
        returns its id once it is replicated."""
        field = f"distribute.{d.runOutputName}.galleryImageId"
        try:
            rid = ResourceId.parse(d.galleryImageId, field=field)
        except ValueError as e:
            raise BuildError(str(e)) from None
        if rid.type.lower() not in ("microsoft.compute/galleries/images",
                                    "microsoft.compute/galleries/images/versions"):
            raise BuildError(f"{field}: '{d.galleryImageId}' is a {rid.type} id; expected an image definition id "
                             "(.../galleries/<g>/images/<definition>) or a version id (.../versions/x.y.z)")
        clients = self.hook.clients(rid.subscription)
        definition = ResourceId(rid.subscription, rid.resource_group, rid.namespace, rid.types[:2], rid.names[:2])
        found = arm.get(clients, definition)
        if found is None:
            raise BuildError(f"{field}: image definition '{definition}' does not exist; create it first "
                             "(az sig image-definition create ...)")
        self._check_definition(field, found["properties"], source)
        listed = [v.as_dict() for v in clients.compute.gallery_image_versions.list_by_gallery_image(
            rid.resource_group, *rid.names[:2])]
        mine = next((v for v in listed if self._ours(v.get("tags"))), None)
        if mine is not None:
            state = arm.provisioning_state(mine)
            if state == "Succeeded":
                return mine["id"]
            if state != "Failed":
                raise self._pending(f"image version {mine['name']}",
                                     [Wait("provisioned", mine["id"], f"image version {mine['name']}")])
            self.log.warning("image version %s is Failed after an earlier try: publishing it again", mine["name"])
            number = mine["name"]
        else:
            number = self._version_number(d, rid, [v["name"] for v in listed], source)
        regions = [{"name": r.name, "regionalReplicaCount": r.replicaCount, "storageAccountType": r.storageAccountType}
                   for r in d.targetRegions or []] or [
            {"name": r, "regionalReplicaCount": 1, "storageAccountType": d.storageAccountType or "Standard_LRS"}
            for r in d.replicationRegions or []] or [
            {"name": found["location"], "regionalReplicaCount": 1, "storageAccountType": "Standard_LRS"}]
        publishing: dict[str, Any] = {"targetRegions": regions, "excludeFromLatest": d.excludeFromLatest}
        if d.replicationMode:
            publishing["replicationMode"] = d.replicationMode
        version_id = definition.child("versions", number)
        self.log.info("publishing %s to %s", version_id, ", ".join(r["name"] for r in regions))
        operation = arm.submit(clients.compute.gallery_image_versions.begin_create_or_update, rid.resource_group,
                               *rid.names[:2], number, {
                                   "location": found["location"], "tags": self._artifact_tags(d, source),
                                   "properties": {"publishingProfile": publishing,
                                                  "storageProfile": storage_profile}})
        raise self._pending(f"image version {number} (replication per region)",
                             [Wait("provisioned", str(version_id), f"image version {number}", operation)])

    def _check_definition(self, field: str, definition: dict[str, Any], source: dict[str, Any]) -> None:
        if definition.get("osType") and definition["osType"] != source["osType"]:
            raise BuildError(f"{field}: the image definition is for {definition['osType']}, the image is "
                             f"{source['osType']}")
        generation = definition.get("hyperVGeneration") or "V1"
        if generation != (source.get("hyperVGeneration") or "V1"):
            raise BuildError(f"{field}: the image definition is Hyper-V generation {generation}, the source image "
                             f"{source.get('hyperVGeneration')}; use a definition of the source's generation")

    def _version_number(self, d: Any, rid: ResourceId, taken: list[str], source: dict[str, Any]) -> str:
        try:
            return versions.choose(explicit=self.build.params.get("galleryImageVersion"),
                                   in_id=rid.name if len(rid.names) == 3 else None, versioning=d.versioning,
                                   source_version=source.get("exactVersion"), taken=taken)[0]
        except versions.VersionError as e:
            raise BuildError(f"distribute.{d.runOutputName}: {e}") from None

    def _distribute_vhd(self, d: Any) -> str:
        blob, account_id = self._vhd_target(d)
        url = blob.url.split("?")[0]
        try:
            props = blob.get_blob_properties()
        except ResourceNotFoundError:
            props = None
        if props is not None and props.metadata.get("goldsmithrun") != self.blob_run_mark:
            raise BuildError(f"distribute.{d.runOutputName}.uri: {url} already exists; Goldsmith doesn't overwrite "
                             "it: delete it or choose another uri")
        copy_status = props.copy.status if props is not None else None
        if copy_status in (None, "failed", "aborted"):
            sas = self.arm.compute.disks.begin_grant_access(self.rg, OS_DISK, {
                "access": "Read", "durationInSeconds": VHD_SAS_SECONDS}).result().as_dict()["accessSAS"]
            blob.start_copy_from_url(sas, metadata={"goldsmithrun": self.blob_run_mark})
            self.log.info("copying the OS disk to %s (server side)", url)
        elif copy_status == "success":
            self.arm.compute.disks.begin_revoke_access(self.rg, OS_DISK).result()
            self._store_sbom_beside(blob)
            return url
        raise self._pending(f"VHD copy to {url}", [Wait("blob_copy", blob.url, f"VHD {d.runOutputName}",
                                                         state=account_id)])

    def _store_sbom_beside(self, vhd: BlobClient) -> None:
        """The build's SBOM as a blob beside the VHD (`<name>.vhd.sbom.cdx.json`): the document travels with it."""
        path = buildsbom.path(self.build)
        if not path.exists():
            return
        base, _, query = vhd.url.partition("?")
        blob = BlobClient.from_blob_url(f"{base}.{sbom.FILE_NAME}" + (f"?{query}" if query else ""),
                                        credential=None if query else vhd.credential, **self.hook.blob_options())
        try:
            blob.upload_blob(path.read_bytes(), overwrite=True,
                             content_settings=ContentSettings(content_type="application/vnd.cyclonedx+json"))
        except HttpResponseError as e:  # e.g. a SAS scoped to the VHD blob alone
            self.log.warning("the SBOM could not be stored beside %s (%s); it is kept in the run's record %s",
                             base, e.reason, path)

    @property
    def blob_run_mark(self) -> str:
        return hashlib.sha256(self.build.run_key.encode()).hexdigest()[:32]

    def _vhd_target(self, d: Any) -> tuple[BlobClient, str | None]:
        """The blob a VHD goes to, and the storage account id whose key writes it (None: the uri's SAS or the
        build identity). `uri` is a blob (…/name.vhd) or a container; empty: a storage account in the staging
        group, which cleanup then keeps."""
        name = f"{self.plan.name}-{d.runOutputName}-{self.build.guid[:8]}.vhd"
        options = self.hook.blob_options()
        if d.uri:
            if not d.uri.startswith(("https://", "http://")):
                raise BuildError(f"distribute.{d.runOutputName}.uri: '{d.uri}' must be a blob or container URL "
                                 "(https://<account>.blob.core.windows.net/<container>[/<name>.vhd]); for a local "
                                 "file, use the local backend")
            base, _, query = d.uri.partition("?")
            url = base if base.lower().endswith(".vhd") else f"{base.rstrip('/')}/{name}"
            url += f"?{query}" if query else ""
            credential = None if query else self.hook.credential
            return BlobClient.from_blob_url(url, credential=credential, **options), None
        account = self._storage_account
        self._wait_for("staging storage account", [self._ensure(T_STORAGE, account, "staging storage account", {
            "location": self.location, "tags": self._tags(**{TAG_KEEP: "vhd"}), "kind": "StorageV2",
            "sku": {"name": "Standard_LRS"},
            "properties": {"allowBlobPublicAccess": False, "minimumTlsVersion": "TLS1_2"}})])
        endpoint = arm.get(self.arm, self._id(T_STORAGE, account))["properties"]["primaryEndpoints"]["blob"]
        key = self.arm.storage.storage_accounts.list_keys(self.rg, account).as_dict()["keys"][0]["value"]
        service = BlobServiceClient(endpoint, credential=key, **options)  # a key string: the account from the URL
        container = service.get_container_client("vhds")
        with contextlib.suppress(HttpResponseError):  # exists already: a retry
            container.create_container()
        return container.get_blob_client(name), str(self._id(T_STORAGE, account))

    # --- cleanup -------------------------------------------------------------------------------------------

    def cleanup(self, *, keep_vm: bool) -> dict[str, Any]:
        with self.arm_errors("cleanup_staging"):
            group = arm.get(self.arm, self.group)
            if group is None:
                self.log.info("staging resource group %s is gone", self.group)
                self._remove_local()
                return {"removed": True}
            tags = group.get("tags") or {}
            created = tags.get(TAG_CREATED_BY) == "goldsmith"
            if created and not self._ours(tags):
                raise BuildError(f"{self.group} is another run's staging group: leaving it alone")
            if keep_vm:
                return self._keep_for_debugging(tags)
            kept = self._kept_storage()
            if created and not kept:
                operation = None
                if arm.provisioning_state(group) != "Deleting":
                    self.log.info("deleting staging resource group %s", self.group)
                    operation = arm.delete(self.arm, self.group)
                raise self._pending("deletion of the staging resource group",
                                    [Wait("deleted", str(self.group), "staging resource group", operation)])
            for phase in DELETE_ORDER:  # a group goldsmith did not create, or one that keeps a VHD
                self._wait_for("deletion of the build resources", [self._delete_ours(*item) for item in phase])
            if kept:
                self.arm.resources.resource_groups.update(self.rg, {"tags": {
                    k: v for k, v in tags.items() if k != TAG_EXPIRY}})
                self.log.warning("the staging group %s keeps storage account %s with the VHD (the VHD target has "
                                 "no uri); delete the group when you no longer need it", self.group, kept)
            elif self._ours(tags):
                self.arm.resources.resource_groups.update(self.rg, {"tags": {
                    k: v for k, v in tags.items() if not k.startswith("goldsmith.")}})
        self._remove_local()
        return {"removed": True, **({"kept": kept} if kept else {})}

    def _delete_ours(self, type_: str, name: str) -> Wait | None:
        rid = self._id(type_, name)
        resource = arm.get(self.arm, rid)
        if resource is None:
            return None
        if not self._ours(resource.get("tags")):
            self.log.warning("%s was not created by this run: leaving it alone", rid)
            return None
        operation = None if arm.provisioning_state(resource) == "Deleting" else arm.delete(self.arm, rid)
        return Wait("deleted", str(rid), f"{type_.split('/')[-1]} {name}", operation)

    @property
    def _storage_account(self) -> str:
        """The staging storage account (VHD targets without uri): 3-24 lowercase letters and digits."""
        return f"gs{hashlib.sha256(self.build.guid.encode()).hexdigest()[:20]}"

    def _kept_storage(self) -> str | None:
        """The staging storage account, if a VHD target without uri put a VHD there."""
        if not any(d.type == "VHD" and not d.uri for d in self.props.distribute):
            return None
        account = self._storage_account
        return account if arm.get(self.arm, self._id(T_STORAGE, account)) is not None else None

    def _keep_for_debugging(self, tags: dict[str, str]) -> dict[str, Any]:
        until = (datetime.now(timezone.utc) + KEEP_FOR_DEBUGGING).isoformat(timespec="seconds")
        self.arm.resources.resource_groups.update(self.rg, {"tags": {**tags, TAG_EXPIRY: until}})
        reach = f"az vm run-command invoke -g {self.rg} -n {VM} --command-id RunPowerShellScript --scripts ..."
        with contextlib.suppress(RuntimeError, BuildError):
            if not self._windows:
                reach = f"ssh -i {self.local / 'id_ed25519'} {BUILD_USER}@{self._address()}"
        self.log.warning(
            "errorHandling is 'abort': the build VM and its network are kept in %s for debugging until %s, then "
            "the janitor deletes them.\n  %s\nWhen done: az group delete -n %s", self.group, until, reach, self.rg)
        return {"removed": False, "kept": str(self.group), "until": until}

    def _remove_local(self) -> None:
        for name in ("id_ed25519", "id_ed25519.pub", "id_ed25519.installing"):
            (self.local / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.local.rmdir()


def _run_command_name(key: str) -> str:
    return "goldsmith-" + re.sub(r"[^A-Za-z0-9_-]+", "-", key).strip("-")[:70]

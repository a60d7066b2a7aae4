"""The azure backend's source resolver: a template's source image, resolved to an exact version in ARM.

Used by `plan` (through the backend), by the source AssetWatcher and by `goldsmith outdated` (through the
registry), so all three agree on what `latest` means: for a platform image the highest version in the build's
region; for a gallery image the highest version that succeeded, is not excludeFromLatest and is replicated to
the build's region.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from azure.core.exceptions import ResourceNotFoundError

from goldsmith import versions
from goldsmith.azure import arm
from goldsmith.azure.arm import ResourceId
from goldsmith.azure.hooks import AzureBuildHook
from goldsmith.core import BuildError
from goldsmith.provenance import Provenance


class AzureSources:
    def __init__(self, hook: AzureBuildHook, location: str):
        self.hook, self.location = hook, location

    def resolve(self, source: Any) -> dict[str, Any]:
        """`source` (the template's, a model or its JSON) as {type, id, exactVersion, parents, osType,
        hyperVGeneration, imageReference}."""
        spec: dict[str, Any] = source if isinstance(source, dict) else source.model_dump(mode="json", exclude_none=True)

        def get(name: str) -> Any:
            return spec.get(name)

        with arm.errors("source"):
            if get("type") == "PlatformImage":
                return self._platform_image(get)
            if get("type") == "ManagedImage":
                return self._managed_image(get("imageId"))
            return self._gallery_version(get("imageVersionId"))

    def latest(self, source: dict[str, Any]) -> tuple[str | None, Provenance | None]:
        """The exact version the source resolves to now (None for a managed image: Azure gives it none), and
        its provenance when Goldsmith published it."""
        resolved = self.resolve(source)
        if resolved["type"] == "PlatformImage":
            return resolved["exactVersion"], None
        rid = ResourceId.parse(resolved["id"])
        with arm.errors("source"):
            tags = (arm.get(self.hook.clients(rid.subscription), rid) or {}).get("tags")
        return resolved["exactVersion"], Provenance.from_tags(tags)

    def _platform_image(self, get: Callable[[str], Any]) -> dict[str, Any]:
        publisher, offer, sku = get("publisher"), get("offer"), get("sku")
        missing = [f for f in ("publisher", "offer", "sku") if not get(f)]
        if missing:
            raise BuildError(f"source: a PlatformImage needs {', '.join(missing)} (e.g. \"publisher\": "
                             "\"Canonical\", \"offer\": \"ubuntu-24_04-lts\", \"sku\": \"server\")")
        images = self.hook.clients().compute.virtual_machine_images
        version = get("version") or "latest"
        urn = f"{publisher}:{offer}:{sku}"
        if version.lower() == "latest":
            try:
                listed = [i.as_dict()["name"] for i in images.list(self.location, publisher, offer, sku)]
            except ResourceNotFoundError:
                listed = []
            if not listed:
                raise BuildError(f"source: no versions of {urn} in {self.location}; check publisher, offer and sku "
                                 f"(az vm image list --location {self.location} --publisher {publisher} --all)")
            version = versions.highest(listed)
        try:
            image = images.get(self.location, publisher, offer, sku, version).as_dict()["properties"]
        except ResourceNotFoundError:
            raise BuildError(f"source: version '{version}' of {urn} is not in {self.location}; use 'latest' or an "
                             "existing version") from None
        plan = image.get("plan")
        if plan and not get("planInfo"):
            raise BuildError(
                f"source.planInfo: {urn} is a marketplace image with a purchase plan; add \"planInfo\": "
                f"{{\"planName\": \"{plan.get('name')}\", \"planProduct\": \"{plan.get('product')}\", "
                f"\"planPublisher\": \"{plan.get('publisher')}\"}} (and accept its terms: az vm image terms accept)")
        return {"type": "PlatformImage", "id": f"{urn}:{version}", "exactVersion": version, "parents": [], "plan": plan,
                "osType": image.get("osDiskImage", {}).get("operatingSystem", "Linux"),
                "hyperVGeneration": image.get("hyperVGeneration") or "V1",
                "imageReference": {"publisher": publisher, "offer": offer, "sku": sku, "version": version}}

    def _managed_image(self, image_id: str) -> dict[str, Any]:
        rid = parse(image_id, "source.imageId", "Microsoft.Compute/images")
        image = arm.get(self.hook.clients(rid.subscription), rid)
        if image is None:
            raise BuildError(f"source.imageId: managed image '{image_id}' does not exist")
        if versions.region(image["location"]) != self.location:
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
        rid = parse(version_id, "source.imageVersionId", "Microsoft.Compute/galleries/images/versions")
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
        return any(versions.region(r["name"]) == self.location for r in regions) or not regions


def parse(value: str, field: str, type_: str) -> ResourceId:
    """An ARM id that must name a `type_`; a BuildError naming `field` otherwise."""
    try:
        rid = ResourceId.parse(value, field=field)
    except ValueError as e:
        raise BuildError(str(e)) from None
    if rid.type.lower() != type_.lower():
        raise BuildError(f"{field}: '{value}' is a {rid.type} id; expected a {type_} id")
    return rid


def resolver(*, home: Path, conn_id: str | None = None, location: str | None = None) -> AzureSources:
    if not location:
        raise BuildError("location: the azure backend resolves sources in the template's region; set \"location\" "
                         "(e.g. \"westeurope\") at the top of the template")
    return AzureSources(AzureBuildHook(conn_id or AzureBuildHook.default_conn_name), versions.region(location))

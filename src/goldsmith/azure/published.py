"""What the Azure publishers published, read back from ARM: the gallery image versions and managed images
that the templates' Azure targets name, with the provenance their tags hold (`Provenance.tags`).

Lineage reads these (through the registry) as it reads the local gallery, so an image published to an Azure
Compute Gallery has its parents and descendants like a local one. Artifacts without Goldsmith's tags
(published by someone else) are left out.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from azure.core.exceptions import HttpResponseError

from goldsmith import core
from goldsmith.azure import arm
from goldsmith.azure.arm import ResourceId
from goldsmith.azure.hooks import AzureBuildHook
from goldsmith.provenance import Artifact, Provenance

log = logging.getLogger(__name__)


def artifacts(home: Path, templates: list[Any]) -> list[Artifact]:
    """Azure artifacts of `templates` (loaded templates whose distribution targets are in Azure)."""
    hooks: dict[str, AzureBuildHook] = {}
    seen: set[str] = set()
    found = []
    for loaded in templates:
        if core.backend_name(loaded.template, loaded.options) not in ("azure", "local+azure"):
            continue
        conn_id = loaded.options.azureConnectionId
        hook = hooks.setdefault(conn_id, AzureBuildHook(conn_id))
        for d in loaded.template.properties.distribute:
            target = getattr(d, "galleryImageId", None) or getattr(d, "imageId", None)
            if not target:
                continue
            try:
                rid = ResourceId.parse(target)
            except ValueError:
                continue  # the build reports a bad id
            if rid.type.lower() == "microsoft.compute/galleries/images/versions":
                rid = ResourceId(rid.subscription, rid.resource_group, rid.namespace, rid.types[:2], rid.names[:2])
            if str(rid).lower() in seen:
                continue
            seen.add(str(rid).lower())
            try:
                found += _published(hook, rid)
            except Exception as e:  # one unreadable target (no connection, no access) hides nothing else
                message = arm.error_message(e) if isinstance(e, HttpResponseError) else str(e)
                log.warning("%s: can't read %s through Airflow connection '%s' (%s); lineage shows the rest",
                            loaded.path, rid, conn_id, message)
    return found


def _published(hook: AzureBuildHook, rid: ResourceId) -> list[Artifact]:
    clients = hook.clients(rid.subscription)
    if rid.type.lower() == "microsoft.compute/images":
        image = arm.get(clients, rid)
        provenance = Provenance.from_tags((image or {}).get("tags"))
        return [Artifact(image["id"], "managedImage", None, "", provenance)] if image and provenance else []
    if rid.type.lower() != "microsoft.compute/galleries/images":
        return []
    if arm.get(clients, rid) is None:
        return []
    found = []
    for v in clients.compute.gallery_image_versions.list_by_gallery_image(rid.resource_group, *rid.names):
        version = v.as_dict()
        provenance = Provenance.from_tags(version.get("tags"))
        if provenance and arm.provisioning_state(version) == "Succeeded":
            published = version["properties"].get("publishingProfile", {}).get("publishedDate") or ""
            found.append(Artifact(version["id"], "galleryImageVersion", version["name"], str(published), provenance))
    return found

"""What Goldsmith checks before it creates a build VM, so a template ARM would refuse fails at once with the
field and the fix instead of after the network is up (or, for the terms, with Azure's wordier refusal):

- `vmProfile.vmSize` against the subscription's `resourceSkus` in the build's location: the size exists,
  is offered there and not restricted for this subscription, boots the source image's hypervisor generation
  and takes the template's data disks;
- `source.planInfo` of a marketplace image with a purchase plan: it names the image's plan, and the plan's
  terms are accepted on the subscription (Microsoft.MarketplaceOrdering agreements).
"""

from __future__ import annotations

import difflib
from typing import Any

from azure.core.exceptions import ResourceNotFoundError

from goldsmith.core import BuildError

AGREEMENTS_API = "2021-01-01"


def check_vm(clients: Any, subscription: str, body: dict[str, Any], source: dict[str, Any]) -> None:
    """Raise BuildError naming the template field if ARM would refuse to create the build VM `body` from
    `source` (what resolve_source found; `plan`: the marketplace image's purchase plan, if it has one)."""
    properties = body["properties"]
    _check_size(clients, body["location"], properties["hardwareProfile"]["vmSize"],
                source.get("hyperVGeneration") or "V1", len(properties["storageProfile"].get("dataDisks") or []))
    if plan := body.get("plan"):
        _check_plan(plan, source.get("plan"), source.get("id", ""))
        _check_terms(clients, subscription, plan)


def _check_size(clients: Any, location: str, size: str, generation: str, data_disks: int,
                field: str = "vmProfile.vmSize") -> None:
    skus = [s.as_dict() for s in clients.compute.resource_skus.list(filter=f"location eq '{location}'")]
    sizes = {s["name"].lower(): s for s in skus if s.get("resource_type", s.get("resourceType")) == "virtualMachines"}
    sku = sizes.get(size.lower())
    if sku is None:
        close = difflib.get_close_matches(size, [s["name"] for s in sizes.values()], n=3)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise BuildError(f"{field}: '{size}' is not a VM size offered in {location}; {hint}list them with "
                         f"`az vm list-skus --location {location} --resource-type virtualMachines --output table`")
    restricted = [r.get("reason_code", r.get("reasonCode")) for r in sku.get("restrictions") or []]
    if restricted:
        raise BuildError(f"{field}: '{size}' is not available to this subscription in {location} "
                         f"({', '.join(restricted)}); choose another size or location, or request access to it")
    capabilities = {c["name"]: c["value"] for c in sku.get("capabilities") or []}
    generations = capabilities.get("HyperVGenerations", "V1").split(",")
    if generation not in generations:
        raise BuildError(f"{field}: '{size}' boots only Hyper-V generation {'/'.join(generations)}, but the source "
                         f"image is generation {generation}; choose a size that supports {generation} (e.g. "
                         "Standard_D2ds_v4) or a source image of the other generation")
    most = int(capabilities.get("MaxDataDiskCount", data_disks))
    if data_disks > most:
        raise BuildError(f"additionalDataDisks: {data_disks} data disks, but '{size}' takes at most {most}; use "
                         "fewer disks or a larger vmProfile.vmSize")


def _check_plan(plan: dict[str, str], image_plan: dict[str, str] | None, image: str) -> None:
    expected = {"planName": (image_plan or {}).get("name"), "planProduct": (image_plan or {}).get("product"),
                "planPublisher": (image_plan or {}).get("publisher")}
    if image_plan is None:
        raise BuildError(f"source.planInfo: {image} has no purchase plan; remove planInfo")
    given = {"planName": plan["name"], "planProduct": plan["product"], "planPublisher": plan["publisher"]}
    wrong = [k for k, v in expected.items() if (given[k] or "").lower() != (v or "").lower()]
    if wrong:
        raise BuildError(f"source.planInfo: {', '.join(f'{k} is {given[k]!r}' for k in wrong)}, but {image}'s plan "
                         f"has {', '.join(f'{k} {expected[k]!r}' for k in wrong)}; use "
                         + ", ".join(f'"{k}": "{v}"' for k, v in expected.items()))


def _check_terms(clients: Any, subscription: str, plan: dict[str, str]) -> None:
    publisher, product, name = plan["publisher"], plan["product"], plan["name"]
    agreement = (f"/subscriptions/{subscription}/providers/Microsoft.MarketplaceOrdering/offerTypes/virtualmachine/"
                 f"publishers/{publisher}/offers/{product}/plans/{name}/agreements/current")
    try:
        found = clients.resources.resources.get_by_id(agreement, api_version=AGREEMENTS_API).as_dict()
    except ResourceNotFoundError:
        raise BuildError(f"source.planInfo: no marketplace plan '{name}' of {publisher}:{product}; copy "
                         "planName, planProduct and planPublisher from `az vm image show` of the source image") from None
    if not (found.get("properties") or {}).get("accepted"):
        raise BuildError(f"source.planInfo: the terms of marketplace plan {publisher}:{product}:{name} are not "
                         f"accepted on subscription {subscription}; accept them once with `az vm image terms accept "
                         f"--publisher {publisher} --offer {product} --plan {name}`")

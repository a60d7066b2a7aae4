"""Microsoft.Compute: virtual machines (with a real guest), disks, images, galleries and their image
definitions and versions, VM run commands, and the marketplace image catalog.

Disk bytes: a disk's content is a small fixed VHD in Azurite (`azurite.py`): the VHD it was imported
from or whose image it was created from, else a generated one naming the disk. `beginGetAccess`
writes it there and returns a real read SAS URL; `endGetAccess` and deleting the disk remove it.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import threading
import time
import uuid
from dataclasses import dataclass, field

from .azurite import fixed_vhd, vhd_problem
from .core import ArmError, Resource, ResourceType, Response, check_location, new_guid, norm_location, now_iso
from .network import NetworkInterface, ip_configurations, ref, same, ssh_allowed
from .vmhost import VmHost

VM = "Microsoft.Compute/virtualMachines"
DISK = "Microsoft.Compute/disks"
IMAGE = "Microsoft.Compute/images"
GALLERY_IMAGE = "Microsoft.Compute/galleries/images"
GALLERY_VERSION = "Microsoft.Compute/galleries/images/versions"
MAX_OS_DISK_GB, MAX_DATA_DISK_GB = 4095, 32767
RUN_COMMAND_TIMEOUT = 90 * 60  # Azure's limit for a Run Command
OUTPUT_LIMIT = 4096  # Run Command returns the last 4096 bytes of each stream
# Azure's reserved admin user names (Linux and Windows)
RESERVED_USERS = {
    "administrator", "admin", "user", "user1", "test", "user2", "test1", "user3", "admin1", "1", "123", "a",
    "actuser", "adm", "admin2", "aspnet", "backup", "console", "david", "guest", "john", "owner", "root",
    "server", "sql", "support", "support_388945a0", "sys", "test2", "test3", "user4", "user5"}


def _missing(name: str) -> ArmError:
    return ArmError(400, "InvalidParameter", f"Required parameter '{name}' is missing (null).")


def _tail(text: str) -> str:
    return text.encode()[-OUTPUT_LIMIT:].decode(errors="replace")


# -- the marketplace ---------------------------------------------------------------------------


@dataclass
class PlatformImage:
    publisher: str
    offer: str
    sku: str
    versions: list[str]
    os_type: str = "Linux"
    hyper_v_generation: str = "V1"
    plan: bool = False  # needs purchase plan information on the VM
    size_gb: int = 30


@dataclass(frozen=True)
class VmSku:
    """A VM size as `resourceSkus` lists it: where it is offered, where this subscription may not use it,
    which hypervisor generations it boots and how many data disks it takes."""

    name: str
    family: str
    vcpus: int
    memory_gb: float
    generations: str = "V1,V2"
    max_data_disks: int = 4
    regions: frozenset[str] | None = None  # None: every region
    restricted: frozenset[str] = frozenset()  # offered there, but NotAvailableForSubscription

    def offered(self, location: str) -> bool:
        return self.regions is None or location in self.regions

    def listing(self, location: str) -> dict:
        caps = {"vCPUs": self.vcpus, "MemoryGB": self.memory_gb, "HyperVGenerations": self.generations,
                "MaxDataDiskCount": self.max_data_disks, "OSVhdSizeMB": 1047552, "PremiumIO": "s" in
                self.name.split("_")[1].lower()[1:]}
        restrictions = [{"type": "Location", "values": [location], "reasonCode": "NotAvailableForSubscription",
                         "restrictionInfo": {"locations": [location]}}] if location in self.restricted else []
        return {"resourceType": "virtualMachines", "name": self.name, "tier": "Standard",
                "size": self.name.split("_", 1)[1], "family": self.family, "locations": [location],
                "locationInfo": [{"location": location, "zones": [], "zoneDetails": []}],
                "capabilities": [{"name": k, "value": str(v)} for k, v in caps.items()],
                "restrictions": restrictions}


VM_SKUS = [
    VmSku("Standard_A1_v2", "standardAv2Family", 1, 2, "V1", 2),
    VmSku("Standard_B1s", "standardBSFamily", 1, 1, max_data_disks=2),
    VmSku("Standard_B2ms", "standardBSFamily", 2, 8),
    VmSku("Standard_D1_v2", "standardDv2Family", 1, 3.5, "V1"),
    VmSku("Standard_D2_v2", "standardDv2Family", 2, 7, max_data_disks=8),
    VmSku("Standard_D2s_v3", "standardDSv3Family", 2, 8),
    VmSku("Standard_D2ds_v4", "standardDDSv4Family", 2, 8),
    VmSku("Standard_D4ds_v4", "standardDDSv4Family", 4, 16, max_data_disks=8),
    VmSku("Standard_D2s_v5", "standardDSv5Family", 2, 8),
    VmSku("Standard_E2s_v5", "standardESv5Family", 2, 16),
    VmSku("Standard_F4s_v2", "standardFSv2Family", 4, 8, max_data_disks=8),
    VmSku("Standard_NV6ads_A10_v5", "StandardNVADSA10v5Family", 6, 55, "V1,V2",
          regions=frozenset({"eastus", "southcentralus", "westeurope"})),
    VmSku("Standard_M8ms", "standardMSFamily", 8, 218.75, max_data_disks=8, restricted=frozenset({"westus2"})),
]


def find_sku(name: str) -> VmSku | None:
    return next((s for s in VM_SKUS if s.name.lower() == name.lower()), None)


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in version.split("."))


@dataclass
class Marketplace:
    """The platform images every region offers. Tests may add their own with `add()`."""

    images: list[PlatformImage] = field(default_factory=lambda: [
        PlatformImage("Canonical", "ubuntu-24_04-lts", "server", ["24.04.202409120", "24.04.202411030",
                                                                  "24.04.202502210"], hyper_v_generation="V2"),
        PlatformImage("Canonical", "0001-com-ubuntu-server-jammy", "22_04-lts", ["22.04.202409110",
                                                                                  "22.04.202502180"]),
        PlatformImage("Canonical", "0001-com-ubuntu-server-jammy", "22_04-lts-gen2", ["22.04.202409110",
                                                                                       "22.04.202502180"],
                      hyper_v_generation="V2"),
        PlatformImage("Debian", "debian-12", "12", ["0.20240717.1810", "0.20241004.1901", "0.20250305.2040"]),
        PlatformImage("Debian", "debian-12", "12-gen2", ["0.20240717.1810", "0.20241004.1901", "0.20250305.2040"],
                      hyper_v_generation="V2"),
        PlatformImage("RedHat", "RHEL", "9-lvm-gen2", ["9.4.2024081415", "9.5.2025011615"], hyper_v_generation="V2",
                      size_gb=64),
        PlatformImage("MicrosoftWindowsServer", "WindowsServer", "2019-Datacenter",
                      ["17763.6293.240905", "17763.6532.241101"], os_type="Windows", size_gb=127),
        PlatformImage("MicrosoftWindowsServer", "WindowsServer", "2022-datacenter-azure-edition",
                      ["20348.2655.240905", "20348.2849.241106"], os_type="Windows", hyper_v_generation="V2",
                      size_gb=127),
        PlatformImage("center-for-internet-security-inc", "cis-ubuntu-linux-2204-l1", "cis-ubuntu2204-l1",
                      ["1.0.12", "1.0.14"], plan=True),
    ])

    accepted: set = field(default_factory=set)  # (publisher, offer, plan), lower case: terms signed

    def accept_terms(self, publisher: str, offer: str, plan: str) -> None:
        self.accepted.add((publisher.lower(), offer.lower(), plan.lower()))

    def agreement(self, double, method: str, rest: list[str], body) -> Response:
        """offerTypes/virtualmachine/publishers/{p}/offers/{o}/plans/{plan}/agreements/current: the
        marketplace terms of a plan (GET), accepted or cancelled by a PUT with properties.accepted."""
        low = [s.lower() for s in rest]
        if len(rest) != 10 or low[:2] != ["offertypes", "virtualmachine"] or low[2:9:2] != [
                "publishers", "offers", "plans", "agreements"] or low[9] != "current":
            raise ArmError(404, "NotFound", f"No route for {'/'.join(rest)} in Microsoft.MarketplaceOrdering of the "
                           "ARM double.")
        publisher, offer, plan = rest[3], rest[5], rest[7]
        key = (publisher.lower(), offer.lower(), plan.lower())
        if not any(i.plan and (i.publisher.lower(), i.offer.lower(), i.sku.lower()) == key for i in self.images):
            raise ArmError(404, "ResourceNotFound", f"Offer {publisher}:{offer}:{plan} has no marketplace terms.")
        if method == "PUT":
            if ((body or {}).get("properties") or {}).get("accepted"):
                self.accepted.add(key)
            else:
                self.accepted.discard(key)
        elif method != "GET":
            raise ArmError(405, "MethodNotAllowed", f"{method} is not supported on agreements.")
        return Response(200, {
            "id": f"/subscriptions/{double.subscription_id}/providers/Microsoft.MarketplaceOrdering/offerTypes/"
                  f"VirtualMachine/publishers/{publisher}/offers/{offer}/plans/{plan}/agreements/current",
            "name": plan, "type": "Microsoft.MarketplaceOrdering/offertypes",
            "properties": {"publisher": publisher, "product": offer, "plan": plan, "accepted": key in self.accepted,
                           "licenseTextLink": "https://example.invalid/terms", "signature": "armdouble",
                           "privacyPolicyLink": "https://example.invalid/privacy",
                           "retrieveDatetime": now_iso()}})

    def add(self, publisher: str, offer: str, sku: str, versions: list[str], **options) -> PlatformImage:
        image = PlatformImage(publisher, offer, sku, list(versions), **options)
        self.images.append(image)
        return image

    def find(self, publisher: str, offer: str, sku: str) -> PlatformImage | None:
        key = (publisher.lower(), offer.lower(), sku.lower())
        return next((i for i in self.images if (i.publisher.lower(), i.offer.lower(), i.sku.lower()) == key), None)

    def resolve(self, reference: dict, location: str) -> tuple[PlatformImage, str]:
        """The image and exact version an imageReference names ("latest" = the highest version)."""
        parts = [reference.get(k) or "" for k in ("publisher", "offer", "sku", "version")]
        image = self.find(*parts[:3])
        version = parts[3]
        if image and version.lower() == "latest":
            version = max(image.versions, key=_version_key)
        if image is None or version not in image.versions:
            raise ArmError(404, "PlatformImageNotFound",
                           f"The platform image '{':'.join(parts)}' is not available. Verify that all fields in the "
                           f"storage profile are correct. For more details about storage profile information, please "
                           f"refer to https://aka.ms/storageprofile (region {location}).")
        return image, version

    def image_id(self, double, location: str, image: PlatformImage, version: str | None = None) -> str:
        base = (f"/Subscriptions/{double.subscription_id}/Providers/Microsoft.Compute/Locations/{location}/Publishers/"
                f"{image.publisher}/ArtifactTypes/VMImage/Offers/{image.offer}/Skus/{image.sku}")
        return f"{base}/Versions/{version}" if version else base

    def serve(self, double, method: str, location: str, rest: list[str], query: dict) -> Response:
        """publishers[/{p}/artifacttypes/vmimage/offers[/{o}/skus[/{s}/versions[/{v}]]]]"""
        if method != "GET":
            raise ArmError(405, "MethodNotAllowed", "The marketplace catalog is read-only.")
        low = [s.lower() for s in rest]
        shape = ["*", "artifacttypes", "vmimage", "offers", "*", "skus", "*", "versions", "*"]
        if len(low) > len(shape) or any(want != "*" and got != want for want, got in zip(shape, low)):
            raise ArmError(404, "NotFound", f"No route for {'/'.join(rest)} in the marketplace of the ARM double.")
        publisher, offer, sku, version = (rest[i] if len(rest) > i else None for i in (0, 4, 6, 8))
        images = [i for i in self.images
                  if (publisher is None or i.publisher.lower() == publisher.lower())
                  and (offer is None or i.offer.lower() == offer.lower())
                  and (sku is None or i.sku.lower() == sku.lower())]
        base = f"/Subscriptions/{double.subscription_id}/Providers/Microsoft.Compute/Locations/{location}/Publishers"
        if len(rest) == 0:
            names = sorted({i.publisher for i in self.images})
            return Response(200, [{"name": n, "location": location, "id": f"{base}/{n}"} for n in names])
        if not images or len(rest) not in (4, 6, 8, 9):
            raise ArmError(404, "NotFound", "Artifact: VMImage was not found.")
        if len(rest) == 4:  # offers
            names = sorted({i.offer for i in images})
            return Response(200, [{"name": n, "location": location,
                                   "id": f"{base}/{publisher}/ArtifactTypes/VMImage/Offers/{n}"} for n in names])
        if len(rest) == 6:  # skus
            return Response(200, [{"name": i.sku, "location": location,
                                   "id": self.image_id(double, location, i)} for i in images])
        image = images[0]
        if len(rest) == 8:  # versions
            versions = sorted(image.versions, key=_version_key, reverse="desc" in query.get("$orderby", "").lower())
            if "$top" in query:
                versions = versions[:int(query["$top"])]
            return Response(200, [{"name": v, "location": location, "id": self.image_id(double, location, image, v)}
                                  for v in versions])
        if version not in image.versions:
            raise ArmError(404, "NotFound", "Artifact: VMImage was not found.")
        properties = {
            "osDiskImage": {"operatingSystem": image.os_type, "sizeInGb": image.size_gb},
            "dataDiskImages": [], "hyperVGeneration": image.hyper_v_generation, "architecture": "x64",
            "automaticOSUpgradeProperties": {"automaticOSUpgradeSupported": False},
            "imageDeprecationStatus": {"imageState": "Active"},
        }
        if image.plan:
            properties["plan"] = {"publisher": image.publisher, "name": image.sku, "product": image.offer}
        return Response(200, {"name": version, "location": location, "properties": properties,
                              "id": self.image_id(double, location, image, version)})


# -- where a disk's bytes and OS come from -----------------------------------------------------


@dataclass
class Source:
    """What a VM, image or gallery version is made from, as far as later steps care."""

    os_type: str
    hyper_v_generation: str
    size_gb: int
    vhd_uri: str | None = None  # the VHD in Azurite its bytes come from, if any


def _source_state(res: Resource) -> Source:
    return res.state["source"]


class _Compute(ResourceType):
    def resolve_source(self, source_id: str | None, location: str, what: str) -> Source:
        """The Source behind a managed image, gallery image (latest version) or version, VM or disk id."""
        target = self.double.find(source_id)
        if target is not None and target.type.lower() == GALLERY_IMAGE.lower():
            target = self.double.handler(GALLERY_IMAGE).latest(target)
        if target is None or "source" not in target.state:
            raise ArmError(404, "NotFound", f"The {what} '{source_id}' cannot be found in '{location}' region.")
        if target.type.lower() == GALLERY_VERSION.lower():
            regions = [norm_location(r["name"]) for r in target.properties["publishingProfile"]["targetRegions"]]
            if norm_location(location) not in regions:
                raise ArmError(404, "NotFound", f"The {what} '{source_id}' cannot be found in '{location}' region: "
                               f"it is replicated to {', '.join(regions)}.")
        return dataclasses.replace(_source_state(target))

    def check_vhd(self, uri: str) -> None:
        store = self.double.blob_store
        if store is None:
            raise ArmError(400, "InvalidParameter", "Blob sources need Azurite: the ARM double has no blob store "
                           "(use the arm_double fixture with azurite).")
        try:
            found = store.read_blob(uri)
        except ValueError as e:
            raise ArmError(400, "InvalidParameter", str(e))
        if found is None:
            raise ArmError(400, "InvalidParameter", f"The blob '{uri}' does not exist.")
        if problem := vhd_problem(*found):
            raise ArmError(400, "BadRequest", f"Blob '{uri}': {problem}")


# -- run commands ------------------------------------------------------------------------------


def _exit_code_first(result: tuple) -> tuple[int, str, str]:
    """A Windows handler answers (stdout, stderr), exiting 0, or (exit code, stdout, stderr)."""
    return result if len(result) == 3 else (0, *result)


class _Execution:
    """A script running in a VM's guest (or given to the Windows handler) on its own thread, so a
    long script does not hold up the double."""

    def __init__(self, double, vm: Resource, command_id: str, script: str, parameters: list[dict], timeout: float):
        self.started, self.ended = now_iso(), None
        self.exit_code, self.stdout, self.stderr, self.timed_out = None, "", "", False
        env = {p["name"]: str(p.get("value", "")) for p in parameters if p.get("name")}
        guest: VmHost | None = vm.state.get("guest")
        if guest is not None:
            work = lambda: guest.run_script(script, env, timeout)
        else:
            work = lambda: _exit_code_first(double.windows_run_command(vm.name, command_id, script, parameters))
        self._thread = threading.Thread(target=self._run, args=(work,), name=f"runcommand-{vm.name}", daemon=True)
        self._thread.start()

    def _run(self, work) -> None:
        try:
            self.exit_code, self.stdout, self.stderr = work()
        except TimeoutError:
            self.timed_out, self.exit_code = True, -1
        except Exception as e:  # the VM was powered off under it, or the Windows handler failed
            self.exit_code, self.stderr = -1, f"{type(e).__name__}: {e}"
        self.ended = now_iso()

    def done(self) -> bool:
        return not self._thread.is_alive()


# -- virtual machines ----------------------------------------------------------------------------


class VirtualMachine(_Compute):
    type = VM

    def validate(self, res, existing, group):
        p = res.properties
        if existing:  # a PUT on an existing VM updates it; what was set at creation stays
            old = existing.properties
            user = (p.get("osProfile") or {}).get("adminUsername")
            if user and user != old["osProfile"]["adminUsername"]:
                raise ArmError(409, "PropertyChangeNotAllowed", "Changing property 'osProfile.adminUsername' is "
                               "not allowed.")
            for key in ("vmId", "timeCreated", "osProfile", "storageProfile", "networkProfile"):
                p[key] = copy.deepcopy(old[key])
            return
        if not (p.get("hardwareProfile") or {}).get("vmSize"):
            raise _missing("hardwareProfile.vmSize")
        sku = self._sku(p["hardwareProfile"]["vmSize"], res.doc["location"])
        storage = p.setdefault("storageProfile", {})
        reference = storage.get("imageReference")
        if not reference:
            raise _missing("storageProfile.imageReference")
        if reference.get("id"):
            source = self.resolve_source(reference["id"], res.doc["location"], "image")
        else:
            image, version = self.double.marketplace.resolve(reference, res.doc["location"])
            self._check_plan(res, image)
            reference["exactVersion"] = version
            source = Source(image.os_type, image.hyper_v_generation, image.size_gb)
        if source.hyper_v_generation not in sku.generations.split(","):
            raise ArmError(400, "BadRequest", f"The selected VM size '{sku.name}' cannot boot Hypervisor Generation "
                           f"'{source.hyper_v_generation[1:]}'. If this was a Create operation please check that the "
                           "Hypervisor Generation of the Image matches the Hypervisor Generation of the selected VM "
                           "Size. If this was an Update operation please select a Hypervisor Generation '"
                           f"{source.hyper_v_generation[1:]}' VM Size.")
        self._validate_os_profile(res, source.os_type)
        disk = self._os_disk(res, group, storage, source)
        data_disks = self._data_disks(res, group, storage, sku)
        nics = self._validate_nics(res)
        p["vmId"] = new_guid()
        p["timeCreated"] = now_iso()
        res.state.update(source=source, power="starting", generalized=False, nics=nics)
        for data_disk in data_disks:
            self.double.add(data_disk)
        self.double.add(disk)

    def _sku(self, size: str, location: str) -> VmSku:
        sku = find_sku(size)
        if sku is None:
            raise ArmError(400, "InvalidParameter", f"The value '{size}' provided for the VM size is not valid. The "
                           "valid sizes in this region are listed by resourceSkus (az vm list-skus --location "
                           f"{location}).")
        if not sku.offered(location) or location in sku.restricted:
            raise ArmError(409, "SkuNotAvailable", f"The requested VM size for resource 'Following SKUs have failed "
                           f"for Capacity Restrictions: {sku.name}' is currently not available in location "
                           f"'{location}'. Please try another size or deploy to a different location or different "
                           "zone. See https://aka.ms/azureskunotavailable for details.")
        return sku

    def _check_plan(self, res: Resource, image: PlatformImage) -> None:
        """A plan image needs the VM's `plan` to name its plan, and its terms accepted on the subscription."""
        plan = res.doc.get("plan")
        if not image.plan:
            if plan:
                raise ArmError(400, "VMMarketplaceInvalidInput", f"Image {image.publisher}:{image.offer}:"
                               f"{image.sku} has no purchase plan; remove the plan information from the request.")
            return
        if not plan:
            raise ArmError(400, "VMMarketplaceInvalidInput", "Creating a virtual machine from Marketplace image "
                           "or a custom image sourced from a Marketplace image requires Plan information in the "
                           "request. VM: '" + res.id + "'.")
        expected = {"name": image.sku, "product": image.offer, "publisher": image.publisher}
        if any((plan.get(k) or "").lower() != v.lower() for k, v in expected.items()):
            raise ArmError(400, "VMMarketplaceInvalidInput", f"The purchase information does not match. Unable to "
                           f"deploy from the Marketplace image. OfferPublisher: '{image.publisher}', Offer: "
                           f"'{image.offer}', Sku: '{image.sku}'; the request names plan {plan.get('name')!r}, "
                           f"product {plan.get('product')!r}, publisher {plan.get('publisher')!r}.")
        if (image.publisher.lower(), image.offer.lower(), image.sku.lower()) not in self.double.marketplace.accepted:
            raise ArmError(400, "MarketplacePurchaseEligibilityFailed", "Marketplace purchase eligibilty check "
                           f"returned errors. See inner errors for details. Details: 'BadRequest: Offer with "
                           f"PublisherId: '{image.publisher}', OfferId: '{image.offer}' cannot be purchased due to "
                           "validation errors. ... You have not accepted the legal terms on this subscription: "
                           f"'{self.double.subscription_id}' for this plan. Before the subscription can be used, you "
                           "need to accept the legal terms of the image.'")

    def _validate_os_profile(self, res: Resource, os_type: str) -> None:
        profile = res.properties.get("osProfile")
        if not profile:
            raise _missing("osProfile")
        user = profile.get("adminUsername")
        if not user:
            raise _missing("osProfile.adminUsername")
        if user.lower() in RESERVED_USERS or not re.fullmatch(r"[a-z_][a-z0-9_.-]{0,63}", user, re.IGNORECASE):
            raise ArmError(400, "InvalidParameter", "The Admin Username specified is not allowed.")
        profile.setdefault("computerName", res.name)
        password = profile.pop("adminPassword", None)  # ARM never returns it
        if os_type == "Windows":
            if not password:
                raise _missing("osProfile.adminPassword")
            profile.setdefault("windowsConfiguration", {"provisionVMAgent": True, "enableAutomaticUpdates": True})
            return
        linux = profile.setdefault("linuxConfiguration", {})
        keys = (linux.get("ssh") or {}).get("publicKeys") or []
        linux.setdefault("disablePasswordAuthentication", bool(keys) and not password)
        if linux["disablePasswordAuthentication"] and not keys:
            raise _missing("osProfile.linuxConfiguration.ssh.publicKeys")
        if not linux["disablePasswordAuthentication"] and not password:
            raise _missing("adminPassword")
        for key in keys:
            expected = f"/home/{user}/.ssh/authorized_keys"
            if key.get("path") != expected:
                raise ArmError(400, "InvalidParameter", f"Destination path for SSH public keys is currently limited "
                               f"to its default value {expected} due to a known issue in Linux provisioning agent.")
            if not (key.get("keyData") or "").startswith(("ssh-rsa ", "ssh-ed25519 ", "ecdsa-sha2-")):
                raise ArmError(400, "InvalidParameter", "The value of parameter linuxConfiguration.ssh.publicKeys."
                               "keyData is invalid.")
        linux.setdefault("provisionVMAgent", True)

    def _validate_nics(self, res: Resource) -> list[Resource]:
        refs = (res.properties.get("networkProfile") or {}).get("networkInterfaces") or []
        if not refs:
            raise _missing("networkProfile.networkInterfaces")
        nics = []
        for item in refs:
            nic = self.double.find(item.get("id"))
            if nic is None or nic.type.lower() != NetworkInterface.type.lower():
                raise ArmError(400, "InvalidResourceReference" if nic else "NotFound",
                               f"Resource {item.get('id')} not found.")
            user = self.double.handler(NetworkInterface.type).user(nic)
            if user and not same(user, res.id):
                raise ArmError(409, "NicInUse", f"Network interface {nic.id} is in use by virtual machine {user}.")
            nics.append(nic)
        return nics

    def _os_disk(self, res: Resource, group: Resource, storage: dict, source: Source) -> Resource:
        os_disk = storage.setdefault("osDisk", {})
        size = os_disk.get("diskSizeGB") or source.size_gb
        if size > MAX_OS_DISK_GB:
            raise ArmError(400, "InvalidParameter", f"The value '{size}' of parameter 'osDisk.diskSizeGB' is out of "
                           f"range. The OS disk size must be between 1 and {MAX_OS_DISK_GB} GB.")
        if size < source.size_gb:
            raise ArmError(400, "InvalidParameter", f"The specified disk size {size} GB is smaller than the size of "
                           f"the corresponding disk in the VM image: {source.size_gb} GB. This is not allowed.")
        name = os_disk.get("name") or f"{res.name}_OsDisk_1_{uuid.uuid4().hex}"
        disk_id = f"{group.id}/providers/Microsoft.Compute/disks/{name}"
        if self.double.find(disk_id):
            raise ArmError(409, "Conflict", f"Disk {disk_id} already exists.")
        managed = os_disk.setdefault("managedDisk", {})
        managed.setdefault("storageAccountType", "Standard_LRS")
        managed["id"] = disk_id
        os_disk.update(name=name, osType=source.os_type, createOption=os_disk.get("createOption") or "FromImage",
                       caching=os_disk.get("caching") or "ReadWrite", diskSizeGB=size,
                       deleteOption=os_disk.get("deleteOption") or "Detach")
        doc = {"id": disk_id, "name": name, "type": DISK, "location": res.doc["location"], "tags": {},
               "sku": {"name": managed["storageAccountType"]},
               "properties": {"osType": source.os_type, "hyperVGeneration": source.hyper_v_generation,
                              "diskSizeGB": size, "diskSizeBytes": size * 2**30, "uniqueId": new_guid(),
                              "timeCreated": now_iso(), "provisioningState": "Succeeded",
                              "creationData": {"createOption": "FromImage",
                                               "imageReference": {"id": storage["imageReference"].get("id") or
                                                                  self._platform_id(res, storage["imageReference"])}}}}
        return Resource(disk_id, DISK, doc, state={"source": source})

    def _data_disks(self, res: Resource, group: Resource, storage: dict, sku: VmSku) -> list[Resource]:
        """Empty data disks created with the VM (the only kind a build VM asks for), as disk resources."""
        disks, luns = [], set()
        items = storage.setdefault("dataDisks", [])
        if len(items) > sku.max_data_disks:
            raise ArmError(409, "OperationNotAllowed", f"The maximum number of data disks allowed to be attached "
                           f"to a VM of this size is {sku.max_data_disks}.")
        for item in items:
            lun = item["lun"]
            if lun in luns or not 0 <= lun <= 63:
                raise ArmError(400, "InvalidParameter", f"The LUN {lun} of a data disk is invalid or used twice: "
                               "each data disk needs its own LUN between 0 and 63.")
            luns.add(lun)
            if item["createOption"] != "Empty":
                raise ArmError(400, "InvalidParameter", f"createOption '{item['createOption']}' for data disks is "
                               "not implemented by the ARM double (Empty).")
            size = item.get("diskSizeGB")
            if not size:
                raise _missing(f"dataDisks[{lun}].diskSizeGB")
            if not 1 <= size <= MAX_DATA_DISK_GB:
                raise ArmError(400, "InvalidParameter", f"The value '{size}' of parameter 'dataDisk.diskSizeGB' is "
                               f"out of range. The value must be between '1' and '{MAX_DATA_DISK_GB}'.")
            name = item.get("name") or f"{res.name}_disk{lun + 2}_{uuid.uuid4().hex}"
            disk_id = f"{group.id}/providers/Microsoft.Compute/disks/{name}"
            managed = item.setdefault("managedDisk", {})
            managed.setdefault("storageAccountType", "Standard_LRS")
            managed["id"] = disk_id
            item.update(name=name, caching=item.get("caching") or "None",
                        deleteOption=item.get("deleteOption") or "Detach")
            disks.append(Resource(disk_id, DISK, {
                "id": disk_id, "name": name, "type": DISK, "location": res.doc["location"], "tags": {},
                "sku": {"name": managed["storageAccountType"]},
                "properties": {"diskSizeGB": size, "diskSizeBytes": size * 2**30, "uniqueId": new_guid(),
                               "timeCreated": now_iso(), "provisioningState": "Succeeded",
                               "creationData": {"createOption": "Empty"}}},
                state={"source": Source("", "V1", size)}))
        return disks

    def _platform_id(self, res: Resource, reference: dict) -> str:
        market = self.double.marketplace
        image = market.find(reference["publisher"], reference["offer"], reference["sku"])
        return market.image_id(self.double, res.doc["location"], image, reference["exactVersion"])

    def provision(self, res):
        if res.state["power"] != "starting":
            return  # an update
        if res.state["source"].os_type == "Linux":
            guest = VmHost(self.double.directory / "vms" / res.properties["vmId"],
                           res.properties["osProfile"]["adminUsername"],
                           [k["keyData"] for k in res.properties["osProfile"]["linuxConfiguration"]
                            .get("ssh", {}).get("publicKeys", [])],
                           self.addresses(res))
            res.state["guest"] = guest
            try:
                guest.start()
            except RuntimeError as e:
                raise ArmError(500, "OSProvisioningInternalError", f"OS Provisioning failed for VM '{res.name}': {e}")
        res.state["power"] = "running"

    def addresses(self, res: Resource) -> list[str]:
        """The VM's addresses SSH may reach (NSGs): its NICs' private IPs and their public IPs."""
        out = []
        for nic in res.state["nics"]:
            for config in ip_configurations(nic):
                if ssh_allowed(self.double, nic, config, from_internet=False):
                    out.append(config["properties"]["privateIPAddress"])
                pip = self.double.find(ref(config["properties"], "publicIPAddress"))
                if pip and ssh_allowed(self.double, nic, config, from_internet=True):
                    out.append(pip.properties["ipAddress"])
        return out

    def view(self, res, query):
        doc = super().view(res, query)
        if query.get("$expand", "").lower() == "instanceview":
            doc["properties"]["instanceView"] = self.instance_view(res)
        return doc

    def instance_view(self, res: Resource) -> dict:
        state = res.properties.get("provisioningState", "Succeeded")
        power = res.state.get("power", "stopped")
        statuses = [{"code": f"ProvisioningState/{state.lower()}", "level": "Error" if state == "Failed" else "Info",
                     "displayStatus": f"Provisioning {state.lower()}", "time": res.properties.get("timeCreated")},
                    {"code": f"PowerState/{power}", "level": "Info", "displayStatus": f"VM {power}"}]
        if res.state.get("generalized"):
            statuses.append({"code": "OSState/generalized", "level": "Info", "displayStatus": "VM generalized"})
        ready = power == "running"
        os_disk = res.properties["storageProfile"]["osDisk"]
        return {
            "computerName": res.properties["osProfile"]["computerName"],
            "hyperVGeneration": res.state["source"].hyper_v_generation,
            "vmAgent": {"vmAgentVersion": "2.12.0.2" if ready else "Unknown", "statuses": [{
                "code": "ProvisioningState/succeeded" if ready else "ProvisioningState/Unavailable",
                "level": "Info" if ready else "Warning", "displayStatus": "Ready" if ready else "Not Ready",
                "message": "Guest Agent is running" if ready else "VM status blob is found but not yet populated."}]},
            "disks": [{"name": os_disk["name"], "statuses": [{"code": "ProvisioningState/succeeded", "level": "Info",
                                                             "displayStatus": "Provisioning succeeded"}]}],
            "statuses": statuses,
        }

    def get_instanceview(self, res, query, body):
        return Response(200, self.instance_view(res))

    def _power_action(self, res: Resource, action: str, during: str, after: str, guest_running: bool) -> Response:
        if res.op and not res.op.done:
            raise ArmError(409, "OperationNotAllowed", f"Operation '{action}' is not allowed on VM '{res.name}' since "
                           "another operation is in progress.")
        if res.state.get("generalized") and guest_running:
            raise ArmError(409, "OperationNotAllowed", f"Operation '{action}' is not allowed on VM '{res.name}' since "
                           "the VM is generalized.")
        res.state["power"] = during

        def finish():
            guest = res.state.get("guest")
            if guest:
                guest.stop()
                if guest_running:
                    guest.addresses = self.addresses(res)
                    guest.start()
            res.state["power"] = after

        res.op = self.double.start_operation(f"virtualMachines/{action}", finish)
        return Response(202, None, self.double.operation_headers(res.op, self.namespace, res.doc["location"]))

    def post_deallocate(self, res, query, body):
        return self._power_action(res, "deallocate", "deallocating", "deallocated", False)

    def post_poweroff(self, res, query, body):
        return self._power_action(res, "powerOff", "stopping", "stopped", False)

    def post_start(self, res, query, body):
        return self._power_action(res, "start", "starting", "running", True)

    def post_restart(self, res, query, body):
        if res.state.get("power") != "running":
            raise ArmError(409, "OperationNotAllowed", f"Operation 'restart' is not allowed on VM '{res.name}' since "
                           "the VM is not running.")
        return self._power_action(res, "restart", "starting", "running", True)

    def post_generalize(self, res, query, body):
        if res.state.get("power") not in ("stopped", "deallocated"):
            raise ArmError(409, "OperationNotAllowed", f"Operation 'generalize' is not allowed on VM '{res.name}' "
                           f"since the VM is {res.state.get('power')}. Deallocate or power off the VM first.")
        res.state["generalized"] = True
        return Response(200)

    def post_runcommand(self, res, query, body):
        if res.state.get("power") != "running":
            raise ArmError(409, "OperationNotAllowed", f"The operation requires the VM '{res.name}' to be running "
                           f"(it is {res.state.get('power')}).")
        linux = res.state["source"].os_type == "Linux"
        command_id = body.get("commandId") or ""
        if command_id != ("RunShellScript" if linux else "RunPowerShellScript"):
            raise ArmError(400, "InvalidParameter", f"Command id '{command_id}' is not supported on this "
                           f"{'Linux' if linux else 'Windows'} VM by the ARM double (RunShellScript on Linux, "
                           "RunPowerShellScript on Windows).")
        script = body.get("script") or []
        parameters = body.get("parameters") or []
        self.double.run_commands.append({"vm": res.id, "commandId": command_id, "script": list(script),
                                         "parameters": copy.deepcopy(parameters)})
        execution = _Execution(self.double, res, command_id, "\n".join(script), parameters, RUN_COMMAND_TIMEOUT)
        op = self.double.start_operation("virtualMachines/runCommand",
                                         lambda: self._run_command_result(linux, execution), ready=execution.done)
        return Response(202, None, self.double.operation_headers(op, self.namespace, res.doc["location"]))

    @staticmethod
    def _run_command_result(linux: bool, e: _Execution) -> dict:
        if not linux:
            status = lambda stream, text: {"code": f"ComponentStatus/{stream}/succeeded", "level": "Info",
                                           "displayStatus": "Provisioning succeeded", "message": _tail(text)}
            return {"value": [status("StdOut", e.stdout), status("StdErr", e.stderr)]}
        streams = f"\n[stdout]\n{_tail(e.stdout)}\n[stderr]\n{_tail(e.stderr)}\n"
        if e.exit_code == 0:
            return {"value": [{"code": "ProvisioningState/succeeded", "level": "Info",
                               "displayStatus": "Provisioning succeeded", "message": "Enable succeeded: " + streams}]}
        return {"value": [{"code": f"ProvisioningState/failed/{e.exit_code}", "level": "Error",
                           "displayStatus": "Provisioning failed",
                           "message": f"Enable failed: failed to execute command: command terminated with exit "
                                      f"status={e.exit_code}" + streams}]}

    def delete(self, res):
        if guest := res.state.get("guest"):
            guest.destroy()
        res.state["power"] = "deallocated"
        # ARM deletes with the VM what the VM's deleteOptions say (default: Detach, i.e. keep).
        doomed = []
        os_disk = res.properties["storageProfile"]["osDisk"]
        for disk in [os_disk, *res.properties["storageProfile"].get("dataDisks", [])]:
            if disk.get("deleteOption") == "Delete":
                doomed.append(disk["managedDisk"]["id"])
        for item in res.properties["networkProfile"]["networkInterfaces"]:
            if (item.get("properties") or {}).get("deleteOption") == "Delete":
                doomed.append(item["id"])
                nic = self.double.find(item["id"])
                for config in ip_configurations(nic) if nic else []:
                    pip = config["properties"].get("publicIPAddress") or {}
                    if (pip.get("properties") or {}).get("deleteOption") == "Delete":
                        doomed.append(pip["id"])
        for resource_id in doomed:
            if target := self.double.find(resource_id):
                self.double.remove(target)


class RunCommand(_Compute):
    """A managed run command (virtualMachines/{vm}/runCommands/{name}): runs when created."""

    type = "Microsoft.Compute/virtualMachines/runCommands"

    def validate(self, res, existing, group):
        vm = self.double.find(res.id.rsplit("/", 2)[0])
        if vm.state.get("power") != "running":
            raise ArmError(409, "OperationNotAllowed", f"The operation requires the VM '{vm.name}' to be running.")
        source = res.properties.get("source") or {}
        if not source.get("script"):
            raise ArmError(400, "InvalidParameter", "The ARM double runs only inline scripts (properties.source."
                           "script), not scriptUri or commandId.")
        parameters = res.properties.get("parameters") or []
        self.double.run_commands.append({"vm": vm.id, "runCommand": res.name, "script": source["script"],
                                         "parameters": copy.deepcopy(parameters)})
        command_id = "RunShellScript" if _source_state(vm).os_type == "Linux" else "RunPowerShellScript"
        res.state["execution"] = _Execution(self.double, vm, command_id, source["script"],
                                            parameters + (res.properties.get("protectedParameters") or []),
                                            res.properties.get("timeoutInSeconds") or RUN_COMMAND_TIMEOUT)
        res.properties.pop("protectedParameters", None)

    def ready(self, res):
        return res.properties.get("asyncExecution") or res.state["execution"].done()

    def view(self, res, query):
        doc = super().view(res, query)
        e: _Execution = res.state["execution"]
        if query.get("$expand", "").lower() == "instanceview":
            state = ("Running" if not e.done() else "TimedOut" if e.timed_out
                     else "Succeeded" if e.exit_code == 0 else "Failed")
            doc["properties"]["instanceView"] = {
                "executionState": state, "executionMessage": "" if e.exit_code in (0, None) else
                f"Execution completed with exit code {e.exit_code}", "exitCode": e.exit_code,
                "output": _tail(e.stdout), "error": _tail(e.stderr), "startTime": e.started, "endTime": e.ended}
        return doc


# -- disks and images ----------------------------------------------------------------------------


class Disk(_Compute):
    type = DISK
    create_status, create_headers = 202, ("Azure-AsyncOperation", "Location")

    def validate(self, res, existing, group):
        if existing:
            for key in ("uniqueId", "timeCreated", "osType", "hyperVGeneration", "creationData"):
                if key in existing.properties:
                    res.properties[key] = existing.properties[key]
            return
        p = res.properties
        creation = p.get("creationData") or {}
        option = creation.get("createOption")
        os_type = p.get("osType")
        generation = p.get("hyperVGeneration") or "V1"
        if option == "Empty":
            if not p.get("diskSizeGB"):
                raise _missing("diskSizeGB")
            source = Source(os_type or "", generation, p["diskSizeGB"])
        elif option == "Import":
            if not creation.get("sourceUri"):
                raise _missing("creationData.sourceUri")
            self.check_vhd(creation["sourceUri"])
            source = Source(os_type or "", generation, p.get("diskSizeGB") or 1, vhd_uri=creation["sourceUri"])
        elif option == "Copy":
            source = self.resolve_source(creation.get("sourceResourceId"), res.doc["location"], "disk")
        else:
            raise ArmError(400, "InvalidParameter", f"createOption '{option}' is not implemented by the ARM double "
                           "for disks (Empty, Import, Copy).")
        p.setdefault("diskSizeGB", source.size_gb)
        p.update(uniqueId=new_guid(), timeCreated=now_iso(), diskSizeBytes=p["diskSizeGB"] * 2**30)
        res.state["source"] = source

    def user(self, res: Resource) -> Resource | None:
        return next((vm for vm in self.double.find_all(VM)
                     for disk in [vm.properties["storageProfile"]["osDisk"],
                                  *vm.properties["storageProfile"].get("dataDisks", [])]
                     if same(disk["managedDisk"]["id"], res.id)), None)

    def view(self, res, query):
        doc = super().view(res, query)
        vm = self.user(res)
        if vm:
            doc["managedBy"] = vm.id
        running = vm is not None and vm.state.get("power") in ("running", "starting", "stopping", "stopped")
        doc["properties"]["diskState"] = ("ActiveSAS" if res.state.get("sas") else "Attached" if running
                                          else "Reserved" if vm else "Unattached")
        return doc

    def post_begingetaccess(self, res, query, body):
        vm = self.user(res)
        if vm is not None and vm.state.get("power") != "deallocated":
            raise ArmError(409, "OperationNotAllowed", f"Disk '{res.name}' is attached to VM '{vm.id}' which is "
                           f"{vm.state.get('power')}; deallocate the VM before granting access to the disk.")
        store = self.double.blob_store
        if store is None:
            raise ArmError(400, "InvalidParameter", "Disk access needs Azurite: the ARM double has no blob store.")
        seconds = int(body.get("durationInSeconds") or 3600)

        def finish():
            blob = f"{res.properties['uniqueId']}.vhd"
            store.write_disk(blob, self.disk_bytes(res))
            res.state["sas"] = blob
            return {"accessSAS": store.disk_sas_url(blob, seconds)}

        res.op = self.double.start_operation("disks/beginGetAccess", finish)
        return Response(202, None, self.double.operation_headers(res.op, self.namespace, res.doc["location"]))

    def post_endgetaccess(self, res, query, body):
        def finish():
            self._revoke(res)

        res.op = self.double.start_operation("disks/endGetAccess", finish)
        return Response(202, None, self.double.operation_headers(res.op, self.namespace, res.doc["location"]))

    def disk_bytes(self, res: Resource) -> bytes:
        source = _source_state(res)
        if source.vhd_uri and (found := self.double.blob_store.read_blob(source.vhd_uri)):
            return found[1]
        return fixed_vhd(f"ARM double disk {res.id} ({source.os_type}, {source.hyper_v_generation})\n".encode())

    def _revoke(self, res: Resource) -> None:
        if blob := res.state.pop("sas", None):
            self.double.blob_store.delete_disk(blob)  # the SAS URL stops working, as on Azure

    def check_delete(self, res):
        if vm := self.user(res):
            raise ArmError(409, "OperationNotAllowed", f"Disk {res.name} is attached to VM {vm.id}.")
        if res.state.get("sas"):
            raise ArmError(409, "OperationNotAllowed", f"Disk {res.name} has an active SAS (diskState ActiveSAS); "
                           "revoke access (endGetAccess) before deleting it.")

    def delete(self, res):
        if self.double.blob_store is not None:
            self._revoke(res)


class Image(_Compute):
    type = IMAGE

    def validate(self, res, existing, group):
        p = res.properties
        storage = p.get("storageProfile") or {}
        os_disk = storage.get("osDisk") or {}
        vm_id = ref(p, "sourceVirtualMachine")
        if vm_id:
            vm = self.double.find(vm_id)
            if vm is None or vm.type.lower() != VM.lower():
                raise ArmError(404, "NotFound", f"The source virtual machine '{vm_id}' cannot be found.")
            if not vm.state.get("generalized"):
                raise ArmError(409, "OperationNotAllowed", f"The source virtual machine '{vm_id}' must be generalized "
                               "to create an image; run generalize after deprovisioning the VM.")
            disk = vm.properties["storageProfile"]["osDisk"]
            source = dataclasses.replace(_source_state(self.double.find(disk["managedDisk"]["id"])),
                                         size_gb=disk["diskSizeGB"])
            p["storageProfile"] = {"osDisk": {"osType": source.os_type, "osState": "Generalized",
                                              "managedDisk": {"id": disk["managedDisk"]["id"]},
                                              "caching": "ReadWrite", "storageAccountType": "Standard_LRS",
                                              "diskSizeGB": source.size_gb}, "dataDisks": []}
        elif os_disk.get("blobUri"):
            for name in ("osType", "osState"):
                if not os_disk.get(name):
                    raise _missing(f"storageProfile.osDisk.{name}")
            self.check_vhd(os_disk["blobUri"])
            source = Source(os_disk["osType"], p.get("hyperVGeneration") or "V1", os_disk.get("diskSizeGB") or 1,
                            vhd_uri=os_disk["blobUri"])
        elif disk_id := ref(os_disk, "managedDisk"):
            source = self.resolve_source(disk_id, res.doc["location"], "disk")
        else:
            raise _missing("sourceVirtualMachine or storageProfile.osDisk")
        p.setdefault("hyperVGeneration", source.hyper_v_generation)
        source.hyper_v_generation = p["hyperVGeneration"]
        res.state["source"] = source


# -- galleries ---------------------------------------------------------------------------------


def _has_children(double, res: Resource) -> bool:
    prefix = res.id.lower() + "/"
    return any(r.id.lower().startswith(prefix) for r in double.find_all(GALLERY_IMAGE) + double.find_all(GALLERY_VERSION))


class Gallery(_Compute):
    type = "Microsoft.Compute/galleries"

    def validate(self, res, existing, group):
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9_.]{0,78}[A-Za-z0-9])?", res.name):
            raise ArmError(400, "InvalidParameter", f"The gallery name '{res.name}' is invalid. The name can contain "
                           "only alphanumerics, underscores and periods, and must start and end with an alphanumeric.")
        res.properties["identifier"] = {"uniqueName": f"{self.double.subscription_id}-{res.name.upper()}"}

    def check_delete(self, res):
        if _has_children(self.double, res):
            raise ArmError(409, "CannotDeleteResource", "Can not delete resource before nested resources are deleted.")


class GalleryImage(_Compute):
    type = GALLERY_IMAGE
    IMMUTABLE = ("osType", "osState", "identifier", "hyperVGeneration")

    def validate(self, res, existing, group):
        p = res.properties
        for name in ("osType", "osState", "identifier"):
            if not p.get(name):
                raise _missing(f"galleryImage.properties.{name}")
        for name in ("publisher", "offer", "sku"):
            if not p["identifier"].get(name):
                raise _missing(f"galleryImage.properties.identifier.{name}")
        p.setdefault("hyperVGeneration", "V1")
        if existing:
            for name in self.IMMUTABLE:
                if p.get(name) != existing.properties.get(name):
                    raise ArmError(409, "PropertyChangeNotAllowed",
                                   f"Changing property 'galleryImage.properties.{name}' is not allowed.")

    def latest(self, res: Resource) -> Resource | None:
        """The highest version not excluded from latest, as `.../images/{name}` (no version) resolves."""
        versions = [v for v in self.double.find_all(GALLERY_VERSION)
                    if v.id.lower().startswith(res.id.lower() + "/")
                    and v.properties.get("provisioningState") == "Succeeded"
                    and not v.properties["publishingProfile"].get("excludeFromLatest")]
        return max(versions, key=lambda v: _version_key(v.name), default=None)

    def check_delete(self, res):
        if _has_children(self.double, res):
            raise ArmError(409, "CannotDeleteResource", "Can not delete resource before nested resources are deleted.")


class GalleryImageVersion(_Compute):
    """Replication: each target region reaches 100% in turn; region i is done after (i+1) times the
    versions/create latency (polls and seconds). `$expand=ReplicationStatus` shows the progress."""

    type = GALLERY_VERSION

    def validate(self, res, existing, group):
        if not re.fullmatch(r"\d{1,9}\.\d{1,9}\.\d{1,9}", res.name):
            raise ArmError(400, "InvalidParameter", f"The gallery image version name '{res.name}' is invalid. It "
                           "must follow the format Major(int32).Minor(int32).Patch(int32), e.g. 1.0.0.")
        p = res.properties
        storage = p.get("storageProfile") or {}
        source_ref = storage.get("source") or {}
        if existing:
            old = existing.properties["storageProfile"].get("source") or {}
            for key in ("id", "virtualMachineId", "uri"):
                if source_ref.get(key) != old.get(key):
                    raise ArmError(409, "PropertyChangeNotAllowed", f"Changing property 'galleryImageVersion."
                                   f"properties.storageProfile.source.{key}' is not allowed.")
        definition = self.double.find(res.id.rsplit("/", 2)[0])
        location = res.doc["location"]
        gallery = self.double.find(res.id.rsplit("/", 4)[0])
        if location != gallery.doc["location"]:
            raise ArmError(400, "InvalidParameter", f"The gallery image version's location '{location}' must be its "
                           f"gallery's location '{gallery.doc['location']}'; replicate to other regions with "
                           "publishingProfile.targetRegions.")
        for region in (p.get("publishingProfile") or {}).get("targetRegions") or []:
            check_location(region.get("name") or "", GALLERY_VERSION)
        vhd = (storage.get("osDiskImage") or {}).get("source") or {}
        if source_ref.get("id") or source_ref.get("virtualMachineId"):
            source = self.resolve_source(source_ref.get("id") or source_ref["virtualMachineId"], location, "source")
            source_resource = self.double.find(source_ref.get("id") or source_ref["virtualMachineId"])
            if source_resource.type.lower() == VM.lower() and not source_resource.state.get("generalized") \
                    and definition.properties["osState"] == "Generalized":
                raise ArmError(409, "OperationNotAllowed", f"The source VM '{source_resource.id}' must be generalized "
                               "for a Generalized image definition.")
        elif vhd.get("uri") or source_ref.get("uri"):
            uri = vhd.get("uri") or source_ref["uri"]
            if not (vhd.get("storageAccountId") or source_ref.get("storageAccountId")):
                raise _missing("galleryImageVersion.properties.storageProfile.osDiskImage.source.storageAccountId")
            self.check_vhd(uri)
            source = Source(definition.properties["osType"], definition.properties["hyperVGeneration"], 1, vhd_uri=uri)
        else:
            raise _missing("galleryImageVersion.properties.storageProfile.source")
        if source.hyper_v_generation != definition.properties["hyperVGeneration"]:
            raise ArmError(400, "InvalidParameter", f"The hypervisor generation of the source ({source.hyper_v_generation}) "
                           f"does not match the gallery image definition's ({definition.properties['hyperVGeneration']}).")
        publishing = p.setdefault("publishingProfile", {})
        replicas = publishing.get("replicaCount") or 1
        storage_type = publishing.get("storageAccountType") or "Standard_LRS"
        regions = publishing.get("targetRegions") or [{"name": location}]
        for region in regions:
            region.setdefault("regionalReplicaCount", replicas)
            region.setdefault("storageAccountType", storage_type)
        if norm_location(location) not in [norm_location(r["name"]) for r in regions]:
            raise ArmError(400, "InvalidParameter", f"The gallery image version's location '{location}' must be one of "
                           "its target regions.")
        publishing.update(targetRegions=regions, replicaCount=replicas, storageAccountType=storage_type,
                          excludeFromLatest=bool(publishing.get("excludeFromLatest")),
                          publishedDate=existing.properties["publishingProfile"]["publishedDate"] if existing
                          else now_iso())
        p.setdefault("safetyProfile", {"allowDeletionOfReplicatedLocations": True})
        p["storageProfile"].setdefault("osDiskImage", {}).update(sizeInGB=source.size_gb, hostCaching="ReadWrite")
        source.os_type = definition.properties["osType"]
        res.state["source"] = source

    def _progress(self, res: Resource, index: int) -> int:
        op = res.op
        if op is None or op.status == "Succeeded" or not op.kind.endswith("/create"):
            return 100
        fractions = [1.0]
        if op.latency.polls:
            fractions.append(op.polls / ((index + 1) * op.latency.polls))
        if op.latency.seconds:
            fractions.append((time.monotonic() - op.started) / ((index + 1) * op.latency.seconds))
        return int(100 * min(1.0, *fractions))

    def ready(self, res):
        return self._progress(res, len(res.properties["publishingProfile"]["targetRegions"]) - 1) == 100

    def view(self, res, query):
        doc = super().view(res, query)
        if query.get("$expand", "").lower() == "replicationstatus":
            failed = res.properties.get("provisioningState") == "Failed"
            summary = []
            for index, region in enumerate(res.properties["publishingProfile"]["targetRegions"]):
                progress = self._progress(res, index)
                summary.append({"region": region["name"], "progress": progress, "details": "",
                                "state": "Failed" if failed and progress < 100
                                else "Completed" if progress == 100 else "Replicating"})
            aggregated = ("Failed" if any(s["state"] == "Failed" for s in summary)
                          else "Completed" if all(s["state"] == "Completed" for s in summary) else "InProgress")
            doc["properties"]["replicationStatus"] = {"aggregatedState": aggregated, "summary": summary}
        return doc


TYPES = [VirtualMachine, RunCommand, Disk, Image, Gallery, GalleryImage, GalleryImageVersion]

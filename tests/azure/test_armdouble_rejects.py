"""The ARM double refuses what ARM refuses, with ARM's status and error code, through the real azure-mgmt-*
clients: checks driven by the published API definitions (armdouble/schema.py: required properties, enums)
and the platform rules (sizes per region and generation from `resourceSkus`, marketplace plans and terms,
regions, tags, disk sizes, NSG rules, references across regions, data disks)."""

from __future__ import annotations

import copy

import pytest
from azure.core.exceptions import HttpResponseError
from test_armdouble import LOCATION, arm, linux_vm_body, network_for_vm, ssh_key  # noqa: F401 - fixtures

GROUP = "rules"
CIS = {"publisher": "center-for-internet-security-inc", "offer": "cis-ubuntu-linux-2204-l1",
       "sku": "cis-ubuntu2204-l1", "version": "latest"}
CIS_PLAN = {"name": "cis-ubuntu2204-l1", "product": "cis-ubuntu-linux-2204-l1",
            "publisher": "center-for-internet-security-inc"}
DEBIAN_GEN2 = {"publisher": "Debian", "offer": "debian-12", "sku": "12-gen2", "version": "latest"}


@pytest.fixture
def group(arm_double) -> str:
    """A resource group that existed before the test (what a test creates inside it is still checked)."""
    arm_double.seed(f"/subscriptions/{arm_double.subscription_id}/resourceGroups/{GROUP}", {"location": LOCATION})
    return GROUP


def refusal(call) -> tuple[int, str, str]:
    """(status, error code, message) of the HttpResponseError the call raises."""
    with pytest.raises(HttpResponseError) as e:
        result = call()
        if hasattr(result, "result"):
            result.result()
    return e.value.status_code, e.value.error.code, e.value.error.message


def vm_body(ssh_key, nic_id="/subscriptions/x/resourceGroups/none/providers/Microsoft.Network/networkInterfaces/n",
            **changes) -> dict:
    body = linux_vm_body(nic_id, ssh_key)
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = body
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return body


def create_vm(arm, body: dict, name: str = "vm"):
    return lambda: arm.compute.virtual_machines.begin_create_or_update(GROUP, name, body)


# --- VM sizes: resourceSkus ------------------------------------------------------------------------------


def test_resource_skus_lists_sizes_per_region_with_generations_and_restrictions(arm):
    skus = {s.name: s for s in arm.compute.resource_skus.list(filter=f"location eq '{LOCATION}'")}
    d1 = {c.name: c.value for c in skus["Standard_D1_v2"].capabilities}
    assert (d1["HyperVGenerations"], d1["vCPUs"], skus["Standard_D1_v2"].locations) == ("V1", "1", [LOCATION])
    assert "Standard_NV6ads_A10_v5" not in skus  # offered elsewhere only
    assert [r.reason_code for r in skus["Standard_M8ms"].restrictions] == ["NotAvailableForSubscription"]
    assert "Standard_NV6ads_A10_v5" in {s.name for s in arm.compute.resource_skus.list(filter="location eq 'eastus'")}


@pytest.mark.parametrize("size, image, expected", [
    ("Standard_Q9_v9", None, (400, "InvalidParameter", "The value 'Standard_Q9_v9' provided for the VM size")),
    ("Standard_NV6ads_A10_v5", None, (409, "SkuNotAvailable", "not available in location 'westus2'")),
    ("Standard_M8ms", None, (409, "SkuNotAvailable", "Standard_M8ms")),
    ("Standard_D1_v2", DEBIAN_GEN2, (400, "BadRequest", "cannot boot Hypervisor Generation '2'")),
])
def test_vm_sizes_are_checked_against_the_region_and_the_image_generation(arm, group, ssh_key, size, image,
                                                                            expected):
    body = vm_body(ssh_key, properties__hardwareProfile__vmSize=size)
    if image:
        body["properties"]["storageProfile"]["imageReference"] = dict(image)
    status, code, message = refusal(create_vm(arm, body))
    assert (status, code) == expected[:2] and expected[2] in message


# --- OS profile, disks -------------------------------------------------------------------------------------


def test_a_linux_vm_needs_an_ssh_key_or_a_password(arm, group, ssh_key):
    body = vm_body(ssh_key)
    body["properties"]["osProfile"]["linuxConfiguration"] = {"disablePasswordAuthentication": False}
    assert refusal(create_vm(arm, body)) == (400, "InvalidParameter", "Required parameter 'adminPassword' is "
                                                                      "missing (null).")


def test_an_os_disk_over_4095_gb_is_refused(arm, group, ssh_key):
    body = vm_body(ssh_key)
    body["properties"]["storageProfile"]["osDisk"]["diskSizeGB"] = 4096
    status, code, message = refusal(create_vm(arm, body))
    assert (status, code) == (400, "InvalidParameter") and "between 1 and 4095" in message


def test_data_disks_are_created_with_the_vm_and_follow_their_delete_option(arm, arm_double, group, ssh_key):
    nic, _ = network_for_vm(arm, group)
    body = vm_body(ssh_key, nic["id"])
    disks = [{"lun": 0, "createOption": "Empty", "diskSizeGB": 8, "deleteOption": "Delete"},
             {"lun": 1, "createOption": "Empty", "diskSizeGB": 16}]
    body["properties"]["storageProfile"]["dataDisks"] = disks
    vm = arm.compute.virtual_machines.begin_create_or_update(GROUP, "vm", body).result()
    sizes = {d.lun: arm.compute.disks.get(GROUP, d.name).disk_size_gb for d in vm.storage_profile.data_disks}
    assert sizes == {0: 8, 1: 16}
    kept = vm.storage_profile.data_disks[1].name
    assert arm.compute.disks.get(GROUP, kept).managed_by == vm.id
    arm.compute.virtual_machines.begin_delete(GROUP, "vm").result()
    assert [d.name for d in arm.compute.disks.list_by_resource_group(GROUP)] == [kept]  # lun 0 went with the VM
    arm.compute.disks.begin_delete(GROUP, kept).result()
    for name in ("nic", "pip", "nsg", "vnet"):
        getattr(arm.network, {"nic": "network_interfaces", "pip": "public_ip_addresses", "nsg":
                              "network_security_groups", "vnet": "virtual_networks"}[name]).begin_delete(GROUP,
                                                                                                        name).result()


@pytest.mark.parametrize("disks, expected", [
    ([{"lun": i, "createOption": "Empty", "diskSizeGB": 1} for i in range(5)], (409, "OperationNotAllowed")),
    ([{"lun": 0, "createOption": "Empty", "diskSizeGB": 1}] * 2, (400, "InvalidParameter")),
    ([{"lun": 0, "createOption": "Empty", "diskSizeGB": 40000}], (400, "InvalidParameter")),
    ([{"createOption": "Empty", "diskSizeGB": 1}], (400, "InvalidParameter")),  # lun is required (the spec)
])
def test_data_disks_that_arm_refuses(arm, group, ssh_key, disks, expected):
    body = vm_body(ssh_key)
    body["properties"]["storageProfile"]["dataDisks"] = copy.deepcopy(disks)
    assert refusal(create_vm(arm, body))[:2] == expected


# --- marketplace plans and terms ---------------------------------------------------------------------------


def test_a_plan_image_needs_its_plan_and_accepted_terms(arm, arm_double, group, ssh_key):
    body = vm_body(ssh_key)
    body["properties"]["storageProfile"]["imageReference"] = dict(CIS)
    assert refusal(create_vm(arm, body))[:2] == (400, "VMMarketplaceInvalidInput")
    body["plan"] = {**CIS_PLAN, "name": "cis-ubuntu2004-l1"}
    status, code, message = refusal(create_vm(arm, body))
    assert (status, code) == (400, "VMMarketplaceInvalidInput") and "does not match" in message
    body["plan"] = dict(CIS_PLAN)
    status, code, message = refusal(create_vm(arm, body))
    assert (status, code) == (400, "MarketplacePurchaseEligibilityFailed") and "legal terms" in message

    agreement = (f"/subscriptions/{arm_double.subscription_id}/providers/Microsoft.MarketplaceOrdering/offerTypes/"
                 "virtualmachine/publishers/center-for-internet-security-inc/offers/cis-ubuntu-linux-2204-l1/plans/"
                 "cis-ubuntu2204-l1/agreements/current")
    assert arm.resources.resources.get_by_id(agreement, api_version="2021-01-01").properties["accepted"] is False
    arm_double.marketplace.accept_terms("center-for-internet-security-inc", "cis-ubuntu-linux-2204-l1",
                                        "cis-ubuntu2204-l1")
    assert arm.resources.resources.get_by_id(agreement, api_version="2021-01-01").properties["accepted"] is True
    # Past the plan checks, the next refusal is the missing NIC: the plan is accepted.
    assert refusal(create_vm(arm, body))[:2] == (400, "NotFound")


def test_a_plan_on_an_image_without_one_is_refused(arm, group, ssh_key):
    body = vm_body(ssh_key)
    body["plan"] = dict(CIS_PLAN)
    assert refusal(create_vm(arm, body))[:2] == (400, "VMMarketplaceInvalidInput")


# --- regions, tags -----------------------------------------------------------------------------------------


def test_regions_that_do_not_exist_are_refused(arm, group):
    status, code, message = refusal(lambda: arm.resources.resource_groups.create_or_update("g", {"location": "mars"}))
    assert (status, code) == (400, "LocationNotAvailableForResourceType") and "'mars'" in message
    assert refusal(lambda: arm.network.public_ip_addresses.begin_create_or_update(
        GROUP, "pip", {"location": "westus9"}))[:2] == (400, "LocationNotAvailableForResourceType")


@pytest.mark.parametrize("tags, code", [
    ({f"t{i}": "v" for i in range(51)}, "InvalidTagCount"),
    ({"owner": "x" * 257}, "InvalidTagValueLength"),
    ({"n" * 513: "v"}, "InvalidTagNameLength"),
])
def test_tags_over_arms_limits_are_refused(arm, group, tags, code):
    assert refusal(lambda: arm.resources.resource_groups.create_or_update("g", {"location": LOCATION,
                                                                              "tags": tags}))[:2] == (400, code)
    assert refusal(lambda: arm.network.public_ip_addresses.begin_create_or_update(
        GROUP, "pip", {"location": LOCATION, "tags": tags}))[:2] == (400, code)
    assert refusal(lambda: arm.resources.resource_groups.update(GROUP, {"tags": tags}))[:2] == (400, code)


# --- network -----------------------------------------------------------------------------------------------


def rule(name: str, priority: int, **changes) -> dict:
    return {"name": name, "properties": {"protocol": "Tcp", "access": "Allow", "direction": "Inbound",
                                         "priority": priority, "sourceAddressPrefix": "*", "sourcePortRange": "*",
                                         "destinationAddressPrefix": "*", "destinationPortRange": "22", **changes}}


@pytest.mark.parametrize("rules, expected", [
    ([rule("a", 100, access="Permit")], (400, "InvalidRequestFormat", "'Permit'")),
    ([rule("a", 100, direction=None)], (400, "InvalidRequestFormat", "properties.direction")),
    ([rule("a", 100), rule("b", 100)], (400, "SecurityRuleConflict", "same Priority and Direction")),
])
def test_nsg_rules_that_arm_refuses(arm, group, rules, expected):
    status, code, message = refusal(lambda: arm.network.network_security_groups.begin_create_or_update(
        GROUP, "nsg", {"location": LOCATION, "properties": {"securityRules": rules}}))
    assert (status, code) == expected[:2] and expected[2] in message


def test_a_rule_added_on_its_own_may_not_take_a_used_priority(arm, group):
    arm.network.network_security_groups.begin_create_or_update(GROUP, "nsg", {
        "location": LOCATION, "properties": {"securityRules": [rule("a", 100)]}}).result()
    assert refusal(lambda: arm.network.security_rules.begin_create_or_update(
        GROUP, "nsg", "b", rule("b", 100)))[:2] == (400, "SecurityRuleConflict")
    arm.network.security_rules.begin_create_or_update(GROUP, "nsg", "b",
                                                      rule("b", 100, direction="Outbound")).result()
    arm.network.network_security_groups.begin_delete(GROUP, "nsg").result()


def test_a_nic_may_not_use_a_subnet_in_another_region(arm, group):
    vnet = arm.network.virtual_networks.begin_create_or_update(GROUP, "vnet", {
        "location": "eastus", "properties": {"addressSpace": {"addressPrefixes": ["10.0.0.0/16"]},
                                             "subnets": [{"name": "s", "properties": {"addressPrefix": "10.0.0.0/24"}}]}
    }).result()
    status, code, message = refusal(lambda: arm.network.network_interfaces.begin_create_or_update(GROUP, "nic", {
        "location": LOCATION, "properties": {"ipConfigurations": [
            {"name": "ip", "properties": {"subnet": {"id": vnet.subnets[0].id}}}]}}))
    assert (status, code) == (400, "InvalidResourceReference") and "same region" in message
    arm.network.virtual_networks.begin_delete(GROUP, "vnet").result()


# --- galleries ---------------------------------------------------------------------------------------------


@pytest.fixture
def definition(arm_double, group) -> str:
    gallery = f"/subscriptions/{arm_double.subscription_id}/resourceGroups/{GROUP}/providers/Microsoft.Compute/galleries/g"
    arm_double.seed(gallery, {"location": LOCATION})
    arm_double.seed(f"{gallery}/images/linux", {"location": LOCATION, "properties": {
        "osType": "Linux", "osState": "Generalized", "identifier": {"publisher": "p", "offer": "o", "sku": "s"}}})
    return f"{gallery}/images/linux"


@pytest.mark.parametrize("location, regions, source, expected", [
    (LOCATION, [LOCATION, "westus9"], "vhd", (400, "LocationNotAvailableForResourceType", "'westus9'")),
    ("eastus", ["eastus"], "vhd", (400, "InvalidParameter", "must be its gallery's location 'westus2'")),
    (LOCATION, [LOCATION], "vhd-without-account", (400, "InvalidParameter", "storageAccountId")),
])
def test_gallery_versions_that_arm_refuses(arm, arm_double, definition, location, regions, source, expected):
    image_source = {"uri": "https://devstoreaccount1.blob.invalid/vhds/os.vhd"}
    if source == "vhd":
        image_source["storageAccountId"] = (f"/subscriptions/{arm_double.subscription_id}/resourceGroups/{GROUP}/providers/"
                                            "Microsoft.Storage/storageAccounts/vhds")
    status, code, message = refusal(lambda: arm.compute.gallery_image_versions.begin_create_or_update(
        GROUP, "g", "linux", "1.0.0", {"location": location, "properties": {
            "publishingProfile": {"targetRegions": [{"name": r} for r in regions]},
            "storageProfile": {"osDiskImage": {"source": image_source}}}}))
    assert (status, code) == expected[:2] and expected[2] in message

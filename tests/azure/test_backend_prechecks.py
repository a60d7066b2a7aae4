"""Goldsmith's own checks before it creates a build VM (goldsmith/azure/prechecks.py), against the ARM double's
`resourceSkus` and marketplace agreements: the message a user sees names the field and the fix, and nothing
but the staging group was created (cleanup removes it)."""

from __future__ import annotations

from typing import Any

import pytest
from test_backend import DEBIAN, LOCATION, drive, env, images, make_build  # noqa: F401 - fixtures

from goldsmith.azure.backend import AzureBackend
from goldsmith.core import BuildError

VHD = {"distribute": [{"type": "VHD", "runOutputName": "v", "uri": "https://x.invalid/c"}]}
CIS = {"type": "PlatformImage", "publisher": "center-for-internet-security-inc", "offer": "cis-ubuntu-linux-2204-l1",
       "sku": "cis-ubuntu2204-l1", "version": "latest"}
CIS_PLAN = {"planName": "cis-ubuntu2204-l1", "planProduct": "cis-ubuntu-linux-2204-l1",
            "planPublisher": "center-for-internet-security-inc"}
GEN2 = {**DEBIAN, "sku": "12-gen2"}


def provision_error(tmp_path, arm_double, properties: dict[str, Any]) -> str:
    """The BuildError provision raises; asserts that no VM, NIC or network was created for it."""
    backend = AzureBackend(make_build(tmp_path, {**VHD, **properties}))
    source = backend.resolve_source()
    drive(backend.prepare_staging)
    try:
        with pytest.raises(BuildError) as e:
            drive(lambda: backend.provision(source))
        created = [c.path for c in arm_double.calls if c.method == "PUT" and "/providers/" in c.path]
        assert created == [], f"prechecks let these through: {created}"
    finally:
        drive(lambda: backend.cleanup(keep_vm=False))
    return str(e.value)


@pytest.mark.parametrize("properties, message", [
    ({"source": DEBIAN, "vmProfile": {"vmSize": "Standard_D2s_v9"}},
     "vmProfile.vmSize: 'Standard_D2s_v9' is not a VM size offered in westus2; did you mean 'Standard_D2s_v5'"),
    ({"source": DEBIAN, "vmProfile": {"vmSize": "Standard_NV6ads_A10_v5"}},
     "vmProfile.vmSize: 'Standard_NV6ads_A10_v5' is not a VM size offered in westus2"),
    ({"source": DEBIAN, "vmProfile": {"vmSize": "Standard_M8ms"}},
     "vmProfile.vmSize: 'Standard_M8ms' is not available to this subscription in westus2 "
     "(NotAvailableForSubscription); choose another size or location"),
    ({"source": GEN2, "vmProfile": {"vmSize": "Standard_D1_v2"}},
     "vmProfile.vmSize: 'Standard_D1_v2' boots only Hyper-V generation V1, but the source image is generation V2; "
     "choose a size that supports V2"),
    ({"source": DEBIAN, "vmProfile": {"vmSize": "Standard_B1s"},
      "additionalDataDisks": [{"sizeGB": 8}, {"sizeGB": 8}, {"sizeGB": 8}]},
     "additionalDataDisks: 3 data disks, but 'Standard_B1s' takes at most 2"),
    ({"source": {**CIS, "planInfo": {**CIS_PLAN, "planName": "cis-ubuntu2004-l1"}}},
     "source.planInfo: planName is 'cis-ubuntu2004-l1', but center-for-internet-security-inc:cis-ubuntu-linux-2204-l1"
     ":cis-ubuntu2204-l1:1.0.14's plan has planName 'cis-ubuntu2204-l1'; use \"planName\": \"cis-ubuntu2204-l1\""),
    ({"source": {**CIS, "planInfo": CIS_PLAN}},
     "source.planInfo: the terms of marketplace plan center-for-internet-security-inc:cis-ubuntu-linux-2204-l1:"
     "cis-ubuntu2204-l1 are not accepted on subscription 00000000-0000-4000-8000-00000000a1b2; accept them once "
     "with `az vm image terms accept --publisher center-for-internet-security-inc --offer cis-ubuntu-linux-2204-l1 "
     "--plan cis-ubuntu2204-l1`"),
])
def test_what_arm_would_refuse_fails_before_anything_is_created(env, arm_double, tmp_path, properties, message):
    assert message in provision_error(tmp_path, arm_double, properties)


def test_a_plan_image_with_accepted_terms_gets_its_vm(env, arm_double, tmp_path):
    arm_double.marketplace.accept_terms("center-for-internet-security-inc", "cis-ubuntu-linux-2204-l1",
                                        "cis-ubuntu2204-l1")
    backend = AzureBackend(make_build(tmp_path, {**VHD, "source": {**CIS, "planInfo": CIS_PLAN},
                                                 "vmProfile": {"vmSize": "Standard_D2s_v3"}}))
    source = backend.resolve_source()
    drive(backend.prepare_staging)
    try:
        vm_id = drive(lambda: backend.provision(source))["vm"]
        vm = arm_double.get(vm_id)
        assert vm["plan"] == {"name": "cis-ubuntu2204-l1", "product": "cis-ubuntu-linux-2204-l1",
                              "publisher": "center-for-internet-security-inc"}
        assert vm["properties"]["hardwareProfile"]["vmSize"] == "Standard_D2s_v3"
    finally:
        drive(lambda: backend.cleanup(keep_vm=False))

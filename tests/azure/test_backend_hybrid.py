"""Build locally, publish to Azure: the distribute step of a local build whose VHD target is a blob URL uploads the
captured image as a fixed VHD page blob (data pages only) and creates the ManagedImage and SharedImage targets in
Azure from it. The captured image is made here with qemu-img, so no VM boots."""

from __future__ import annotations

import datetime
import json
import logging
import subprocess

from azure.storage.blob import BlobServiceClient, ContainerSasPermissions, generate_container_sas
from test_backend import LOCATION, drive, env, images  # noqa: F401 - env and images are fixtures

from goldsmith import runoutputs
from goldsmith.azure.hooks import AzureBuildHook
from goldsmith.azure.publish import HybridBackend
from goldsmith.core import Build, backend_for
from goldsmith.local import disk
from goldsmith.template.loader import load_template
from goldsmith.template.plan import make_plan

MIB = 1024 * 1024


def storage_container(images: str) -> tuple[str, str]:
    """A team's storage account in the double (an Azurite account behind it): its id and a container SAS URL."""
    clients = AzureBuildHook().clients()
    group = images.rsplit("/", 1)[1]
    clients.storage.storage_accounts.begin_create(group, "teamvhds", {
        "location": LOCATION, "kind": "StorageV2", "sku": {"name": "Standard_LRS"}}).result()
    account = clients.storage.storage_accounts.get_properties(group, "teamvhds").as_dict()
    key = clients.storage.storage_accounts.list_keys(group, "teamvhds").as_dict()["keys"][0]["value"]
    service = BlobServiceClient(account["properties"]["primaryEndpoints"]["blob"], credential=key)
    container = service.create_container("images")
    sas = generate_container_sas(service.account_name, "images", account_key=key,
                                 permission=ContainerSasPermissions(read=True, write=True, create=True),
                                 expiry=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1))
    return account["id"], f"{container.url}?{sas}"


def test_a_local_build_publishes_its_vhd_and_images_to_azure(env, arm_double, images, tmp_path, caplog):
    account_id, container = storage_container(images)
    definition = f"{images}/providers/Microsoft.Compute/galleries/golden/images/linux"
    template = tmp_path / "hybrid.json"
    template.write_text(json.dumps({"location": LOCATION, "goldsmith": {"backend": "local"}, "properties": {
        "source": {"type": "PlatformImage", "publisher": "Debian", "offer": "debian-12", "sku": "12"},
        "distribute": [
            {"type": "VHD", "runOutputName": "vhd", "uri": container},
            {"type": "ManagedImage", "runOutputName": "managed", "location": LOCATION,
             "imageId": f"{images}/providers/Microsoft.Compute/images/from-local"},
            {"type": "SharedImage", "runOutputName": "sig", "galleryImageId": definition,
             "targetRegions": [{"name": LOCATION}]}]}}))
    build = Build(make_plan(load_template(template)), "hybrid", "manual__1", {}, logging.getLogger("test.hybrid"))
    backend = backend_for(build)
    assert isinstance(backend, HybridBackend)

    # A captured image as the local backend leaves it: 24 MiB, data in its first and last MiB only.
    backend.staging.mkdir(parents=True)
    raw = tmp_path / "image.raw"
    with open(raw, "wb") as f:
        f.truncate(24 * MIB)
        f.write(b"boot sector".ljust(512, b"\0"))
        f.seek(23 * MIB)
        f.write(b"root filesystem" * 1000)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, backend.staging / "image.qcow2"], check=True)

    caplog.set_level(logging.INFO)
    source = {"type": "PlatformImage", "id": "Debian:debian-12:12:0.20250305.2040", "exactVersion": "0.20250305.2040"}
    outputs = {s.name: drive(lambda: backend.distribute(s, source)) for s in build.plan.distribute_steps()}

    assert caplog.text.count("uploaded image.vhd") == 1  # one upload, shared by the three targets
    vhd_url = outputs["vhd"]["artifactUri"]
    assert vhd_url == container.split("?")[0] + f"/hybrid-{build.guid[:8]}.vhd"
    blob = BlobServiceClient(container.split("/images?")[0], credential=container.split("?")[1]) \
        .get_blob_client("images", vhd_url.rsplit("/", 1)[1])
    local_vhd = (backend.staging / "image.vhd").read_bytes()
    assert blob.download_blob().readall() == local_vhd and disk.read_vhd_footer(backend.staging / "image.vhd")
    written = sum(r.end - r.start + 1 for r in blob.list_page_ranges() if not r.cleared)
    assert written < 2 * MIB  # the zeros were never sent

    image = arm_double.get(outputs["managed"]["artifactId"])
    assert image["properties"]["storageProfile"]["osDisk"]["blobUri"] == vhd_url
    version = arm_double.get(outputs["sig"]["artifactId"])
    assert outputs["sig"]["artifactId"] == f"{definition}/versions/0.0.1"
    assert version["properties"]["storageProfile"]["osDiskImage"]["source"] == {"uri": vhd_url,
                                                                                "storageAccountId": account_id}
    _, recorded = runoutputs.list_outputs("hybrid", "manual__1")
    assert sorted(o["name"] for o in recorded) == ["managed", "sig", "vhd"]
    arm_double.keep(account_id, outputs["managed"]["artifactId"], outputs["sig"]["artifactId"])

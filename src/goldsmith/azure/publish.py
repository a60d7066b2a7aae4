"""Build locally, publish to Azure: a local-backend template whose VHD target is a blob URL (https://).

The VM, customizers and capture are the local backend's (QEMU on this host: cheaper and faster than an Azure
build VM); distribution goes to Azure. The captured image is made a fixed VHD and uploaded as a page blob to the
VHD target (4 MiB pages in parallel, holes and all-zero pages skipped: a new page blob reads as zeros), then the
template's ManagedImage and SharedImage targets are created in Azure from that blob.
"""

from __future__ import annotations

import fcntl
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import BlobClient

from goldsmith.azure.backend import AzureBackend
from goldsmith.core import Build, BuildError, azure_vhd_target
from goldsmith.local import disk
from goldsmith.local.backend import LocalBackend
from goldsmith.template.plan import Step

PAGE = 4 * 1024 * 1024  # the most one Put Page carries
UPLOAD_THREADS = 8
COMPLETE = "goldsmithuploaded"  # blob metadata: the upload of this run finished


class HybridBackend(LocalBackend):
    def __init__(self, build: Build):
        super().__init__(build)
        self.azure = AzureBackend(build)
        # What the local backend builds: a Linux image that boots with BIOS (Hyper-V generation 1).
        self.image_kind = {"osType": "Linux", "hyperVGeneration": "V1"}

    def distribute(self, step: Step, source: dict[str, Any]) -> dict[str, Any]:
        d = step.item
        target = self._vhd_target()
        url = target.split("?")[0]
        self._upload_once(target)
        source = {**source, **self.image_kind}
        with self.azure.arm_errors(step.task_id):
            if d.type == "VHD":
                artifact_id, artifact_uri = None, url
            elif d.type == "ManagedImage":
                artifact_id, artifact_uri = self.azure.publish_managed_image(d, source, {
                    "storageProfile": {"osDisk": {"osType": "Linux", "osState": "Generalized", "blobUri": url}},
                    "hyperVGeneration": self.image_kind["hyperVGeneration"]}), None
            else:
                artifact_id, artifact_uri = self.azure.publish_gallery_version(d, source, {"osDiskImage": {
                    "source": {"uri": url, "storageAccountId": self._storage_account_id(url)}}}), None
        return self.azure.record_output(step, source, artifact_id, artifact_uri)

    def _vhd_target(self) -> str:
        """The blob the VHD goes to: the VHD target's uri, a `.vhd` blob or a container (SAS included)."""
        base, _, query = azure_vhd_target(self.build.plan).uri.partition("?")
        if not base.lower().endswith(".vhd"):
            base = f"{base.rstrip('/')}/{self.build.plan.name}-{self.build.guid[:8]}.vhd"
        return f"{base}?{query}" if query else base

    def _upload_once(self, target: str) -> None:
        """Parallel distribute tasks share one upload: a lock in the staging area, and a mark on the blob."""
        image = self.staging / "image.qcow2"
        if not image.exists():
            raise BuildError(f"distribute: no captured image in {self.staging}")
        credential = None if "?" in target else self.azure.hook.credential
        blob = BlobClient.from_blob_url(target, credential=credential, **self.azure.hook.blob_options())
        with open(self.staging / "azure-upload.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if blob.get_blob_properties().metadata.get(COMPLETE) == self.azure.blob_run_mark:
                    return
            except ResourceNotFoundError:
                pass
            vhd = self.staging / "image.vhd"
            if not vhd.exists():
                disk.to_fixed_vhd(image, vhd)
            sent = upload_page_blob(vhd, blob)
            blob.set_blob_metadata({COMPLETE: self.azure.blob_run_mark})
        self.log.info("uploaded %s to %s: %d of %d MiB had data", vhd.name, blob.url.split("?")[0],
                      sent // 2**20, vhd.stat().st_size // 2**20)

    def _storage_account_id(self, url: str) -> str:
        """A gallery version made from a blob names its storage account: the one whose blob endpoint it is on."""
        clients = self.azure.arm
        for account in clients.storage.storage_accounts.list():
            account = account.as_dict()
            endpoint = (account.get("properties", {}).get("primaryEndpoints") or {}).get("blob")
            if endpoint and url.startswith(endpoint):
                return account["id"]
        raise BuildError(f"distribute: {url} is not in a storage account of subscription {self.azure.subscription}; "
                         "a gallery version needs the VHD in a storage account it can name")


def upload_page_blob(vhd: Path, blob: BlobClient) -> int:
    """Creates `blob` as a page blob of the VHD's size and writes its non-zero pages in parallel; returns the
    number of bytes sent."""
    size = vhd.stat().st_size
    blob.create_page_blob(size)

    def put(offset: int, length: int) -> int:
        with open(vhd, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        if not data.strip(b"\0"):
            return 0
        blob.upload_page(data, offset=offset, length=len(data))
        return len(data)

    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        return sum(pool.map(lambda page: put(*page), pages(vhd, size)))


def pages(path: Path, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the 512-aligned, at most 4 MiB pieces of the file that hold data (holes skipped)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                return
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            start -= start % 512
            end += -end % 512
            for piece in range(start, end, PAGE):
                yield piece, min(PAGE, end - piece)
            offset = end
    finally:
        os.close(fd)

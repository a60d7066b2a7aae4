"""Azurite, Microsoft's blob storage emulator (npm package `azurite`), as the double's storage.

`make setup` installs it into .venv/azurite (next to the Python tools, and removed with them by
`make clean`). `running_azurite()` starts azurite-blob on a free port with its data in a temp dir and
these accounts: devstoreaccount1 (Azurite's well-known one, for tests and for the double's own disk
blobs) and a pool of POOL_SIZE more that back the storage accounts clients create through ARM.
The double keeps disks' bytes here as fixed VHD page blobs and hands out real SAS URLs for them.
"""

from __future__ import annotations

import base64
import datetime
import os
import socket
import struct
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import BlobSasPermissions, BlobServiceClient, generate_blob_sas

REPO = Path(__file__).resolve().parents[3]
AZURITE_BLOB = REPO / ".venv" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
# Azurite's one built-in account (documented, public): https://learn.microsoft.com/azure/storage/common/storage-use-azurite
ACCOUNT_NAME = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
DISKS = "armdouble-disks"  # the container holding managed disks' bytes
POOL_SIZE = 8  # storage accounts that can exist at once in the double
MIB = 1024 * 1024


@dataclass(frozen=True)
class Azurite:
    """`account_name`, `account_key`, `blob_endpoint` (http://127.0.0.1:PORT/devstoreaccount1) and
    `connection_string` are devstoreaccount1's; `keys` has every account's key."""

    host: str  # http://127.0.0.1:PORT
    keys: dict[str, str]
    pid: int
    account_name: str = ACCOUNT_NAME

    @property
    def account_key(self) -> str:
        return self.keys[self.account_name]

    @property
    def blob_endpoint(self) -> str:
        return self.endpoint(self.account_name)

    def endpoint(self, account: str) -> str:
        return f"{self.host}/{account}"

    @property
    def pool(self) -> list[str]:
        return [a for a in self.keys if a != ACCOUNT_NAME]

    @property
    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={self.account_name};AccountKey={self.account_key};"
                f"BlobEndpoint={self.blob_endpoint};")

    def service(self, account: str = ACCOUNT_NAME) -> BlobServiceClient:
        return BlobServiceClient(self.endpoint(account), credential={"account_name": account,
                                                                     "account_key": self.keys[account]})

    def wipe(self, account: str) -> None:
        """Delete every container of an account (its storage account was deleted)."""
        service = self.service(account)
        for container in service.list_containers():
            service.delete_container(container.name)

    # -- what the double does with it -----------------------------------------------------------

    def write_disk(self, name: str, data: bytes) -> None:
        """Store a disk's bytes (a fixed VHD, size a multiple of 512) as a page blob."""
        container = self.service().get_container_client(DISKS)
        if not container.exists():
            container.create_container()
        blob = container.get_blob_client(name)
        blob.create_page_blob(len(data))
        for offset in range(0, len(data), 4 * MIB):  # a page write carries at most 4 MiB
            chunk = data[offset:offset + 4 * MIB]
            if chunk.strip(b"\0"):
                blob.upload_page(chunk, offset=offset, length=len(chunk))

    def disk_sas_url(self, name: str, seconds: int) -> str:
        expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds)
        sas = generate_blob_sas(self.account_name, DISKS, name, account_key=self.account_key,
                                permission=BlobSasPermissions(read=True), expiry=expiry)
        return f"{self.blob_endpoint}/{DISKS}/{name}?{sas}"

    def delete_disk(self, name: str) -> None:
        try:
            self.service().get_blob_client(DISKS, name).delete_blob()
        except ResourceNotFoundError:
            pass

    def read_blob(self, uri: str) -> tuple[str, bytes] | None:
        """(blob type, bytes) of the blob a URI names in this Azurite, or None if it does not exist.
        The double's disks are small, so reading them whole is fine."""
        account, container, name = self.locate(uri)
        blob = self.service(account).get_blob_client(container, name)
        try:
            properties = blob.get_blob_properties()
        except ResourceNotFoundError:
            return None
        return str(properties.blob_type), blob.download_blob().readall()

    def locate(self, uri: str) -> tuple[str, str, str]:
        """(account, container, blob) from a blob URI of this Azurite (path-style: /account/container/blob)."""
        parts = urlsplit(uri)
        account, _, rest = parts.path.lstrip("/").partition("/")
        container, _, name = rest.partition("/")
        if f"{parts.scheme}://{parts.netloc}" != self.host or account not in self.keys or not name:
            raise ValueError(f"{uri} is not a blob in the test storage ({self.host}, accounts {', '.join(self.keys)})")
        return account, container, name


def fixed_vhd(data: bytes) -> bytes:
    """`data` padded to whole MiB, with a fixed-VHD footer: what Azure accepts as a disk image."""
    size = -(-max(len(data), 1) // MIB) * MIB
    cylinders, heads, sectors = min(size // 512 // (16 * 63), 65535), 16, 63
    footer = bytearray(struct.pack(
        ">8sIIQI4sI4sQQHBBII16sB", b"conectix", 2, 0x00010000, 0xFFFFFFFFFFFFFFFF,
        int(time.time()) - 946684800, b"gsad", 0x00010000, b"Wi2k", size, size,
        cylinders, heads, sectors, 2, 0, uuid.uuid4().bytes, 0))
    footer += bytes(512 - len(footer))
    struct.pack_into(">I", footer, 64, ~sum(footer) & 0xFFFFFFFF)
    return data.ljust(size, b"\0") + bytes(footer)


def vhd_problem(blob_type: str, data: bytes) -> str | None:
    """Why Azure would refuse this blob as a disk image, or None."""
    if "page" not in blob_type.lower():
        return f"The blob is a {blob_type}; a VHD must be uploaded as a page blob."
    if len(data) < 512 or len(data) % 512:
        return f"The blob's size {len(data)} is not a multiple of 512 bytes: it is not a VHD."
    footer = data[-512:]
    if footer[:8] != b"conectix":
        return "The specified cookie value in VHD footer indicates that the disk is not a supported VHD. " \
               "Disk is expected to have cookie value 'conectix'."
    if struct.unpack(">I", footer[60:64])[0] != 2:
        return "The VHD is not a fixed VHD: Azure only supports fixed-size VHDs."
    if (len(data) - 512) % MIB:
        return f"The VHD's virtual size {len(data) - 512} is not a whole number of MiB."
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_azurite() -> Iterator[Azurite]:
    """azurite-blob on 127.0.0.1 (a free port), data in a temp dir; stopped and removed afterwards."""
    if not AZURITE_BLOB.exists():
        raise FileNotFoundError(f"{AZURITE_BLOB} missing: run `make setup` (it runs npm install azurite@3)")
    keys = {ACCOUNT_NAME: ACCOUNT_KEY, **{f"armdouble{i}": base64.b64encode(os.urandom(64)).decode()
                                          for i in range(1, POOL_SIZE + 1)}}
    with tempfile.TemporaryDirectory(prefix="goldsmith-azurite-") as tmp:
        port = _free_port()
        log = open(Path(tmp) / "azurite.log", "wb")
        proc = subprocess.Popen(
            [str(AZURITE_BLOB), "--silent", "--skipApiVersionCheck", "--disableTelemetry", "--location",
             f"{tmp}/data", "--blobHost", "127.0.0.1", "--blobPort", str(port)],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            env={**os.environ, "AZURITE_ACCOUNTS": ";".join(f"{a}:{k}" for a, k in keys.items())})
        try:
            _wait_listening(port, proc, Path(tmp) / "azurite.log")
            yield Azurite(f"http://127.0.0.1:{port}", keys, proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


def _wait_listening(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"azurite-blob exited with {proc.returncode}: {log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"azurite-blob did not listen on port {port} within 30s: {log.read_text()}")

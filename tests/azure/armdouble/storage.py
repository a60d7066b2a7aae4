"""Microsoft.Storage/storageAccounts, each backed by one of Azurite's pool accounts.

A storage account's `primaryEndpoints.blob` is its Azurite account's endpoint
(http://127.0.0.1:PORT/armdoubleN/) and `listKeys` returns that account's key, so a client that
reads both from ARM (as it should, rather than building https://NAME.blob.core.windows.net) really
reads and writes blobs there. Deleting the storage account deletes its containers.
As on Azure, creating one answers 202 with a Location to poll, and deleting it is immediate.
"""

from __future__ import annotations

import re

from .core import ArmError, Resource, ResourceType, Response, now_iso


class StorageAccount(ResourceType):
    type = "Microsoft.Storage/storageAccounts"
    create_status, create_headers, create_body = 202, ("Location",), False
    synchronous_delete = True

    def validate(self, res, existing, group):
        if not re.fullmatch(r"[a-z0-9]{3,24}", res.name):
            raise ArmError(400, "AccountNameInvalid", f"{res.name} is not a valid storage account name. Storage "
                           "account name must be between 3 and 24 characters in length and use numbers and "
                           "lower-case letters only.")
        taken = [a for a in self.double.find_all(self.type) if a.name == res.name and a.id.lower() != res.id.lower()]
        if taken:
            raise ArmError(409, "StorageAccountAlreadyTaken", f"The storage account named {res.name} is already taken.")
        if not res.doc.get("kind") or not (res.doc.get("sku") or {}).get("name"):
            raise ArmError(400, "MissingRequiredProperty", "The storage account needs 'kind' and 'sku.name'.")
        store = self.double.blob_store
        if store is None:
            raise ArmError(400, "InvalidParameter", "Storage accounts need Azurite: the ARM double has no blob store.")
        if existing:
            res.state = existing.state
        else:
            used = {a.state["azurite_account"] for a in self.double.find_all(self.type)}
            free = [a for a in store.pool if a not in used]
            if not free:
                raise ArmError(409, "TooManyStorageAccounts", f"The ARM double backs at most {len(store.pool)} "
                               "storage accounts at once (Azurite's account pool).")
            res.state["azurite_account"] = free[0]
        endpoint = store.endpoint(res.state["azurite_account"]) + "/"
        res.properties.update(
            primaryEndpoints={"blob": endpoint}, primaryLocation=res.doc["location"], statusOfPrimary="available",
            creationTime=existing.properties["creationTime"] if existing else now_iso(),
            accessTier=res.properties.get("accessTier") or "Hot",
            supportsHttpsTrafficOnly=res.properties.get("supportsHttpsTrafficOnly", True),
            minimumTlsVersion=res.properties.get("minimumTlsVersion") or "TLS1_2")

    def post_listkeys(self, res: Resource, query, body) -> Response:
        key = self.double.blob_store.keys[res.state["azurite_account"]]
        return Response(200, {"keys": [{"keyName": "key1", "value": key, "permissions": "FULL"},
                                       {"keyName": "key2", "value": key, "permissions": "FULL"}]})

    def delete(self, res):
        self.double.blob_store.wipe(res.state["azurite_account"])


TYPES = [StorageAccount]

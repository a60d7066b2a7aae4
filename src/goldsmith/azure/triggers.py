"""The async trigger a deferred build step waits on: it polls ARM (aio clients) until every wait is over.

The step that deferred runs again when the trigger fires and continues from what now exists, so the event
carries only whether the waits ended well. A non-deferrable operator runs the same trigger in its own process.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

from airflow.triggers.base import BaseTrigger, TriggerEvent
from azure.core.exceptions import AzureError, HttpResponseError
from azure.storage.blob.aio import BlobClient

from goldsmith.azure import arm
from goldsmith.azure.hooks import ArmClients, ArmSettings, AzureBuildHook

# Polls that fail in a row (after azure-core's own retries) before the wait is given up as failed.
MAX_POLL_ERRORS = 10


class ArmWaitTrigger(BaseTrigger):
    def __init__(self, conn_id: str, waits: list[dict[str, Any]], poll_interval: float = 15.0):
        super().__init__()
        self.conn_id = conn_id
        self.waits = waits
        self.poll_interval = poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("goldsmith.azure.triggers.ArmWaitTrigger",
                {"conn_id": self.conn_id, "waits": self.waits, "poll_interval": self.poll_interval})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        waits = [arm.Wait.from_json(w) for w in self.waits]
        started, notes, errors = time.monotonic(), {}, 0
        async with AzureBuildHook.async_clients(self.conn_id) as (settings, clients):
            blob_check = _BlobCheck(settings, clients)
            while waits:
                remaining = []
                for wait in waits:
                    try:
                        progress = await arm.check(clients, wait, blob_check)
                        errors = 0
                    except (HttpResponseError, AzureError) as e:
                        errors += 1
                        message = arm.error_message(e) if isinstance(e, HttpResponseError) else str(e)
                        if errors >= MAX_POLL_ERRORS:
                            yield TriggerEvent({"status": "error", "message": f"{wait.label}: polling failed "
                                                f"{errors} times in a row; last: {message}"})
                            return
                        self.log.warning("%s: polling failed (%s); trying again", wait.label, message)
                        remaining.append(wait)
                        continue
                    if progress.error:
                        yield TriggerEvent({"status": "error", "message": progress.error})
                        return
                    if progress.note and notes.get(wait.id) != progress.note:
                        notes[wait.id] = progress.note
                        self.log.info("%s: %s", wait.label, progress.note)
                    if progress.done:
                        self.log.info("%s: done after %.0f s", wait.label, time.monotonic() - started)
                    else:
                        remaining.append(wait)
                waits = remaining
                if waits:
                    await asyncio.sleep(self.poll_interval)
        yield TriggerEvent({"status": "success", "waits": self.waits})


class _BlobCheck:
    """The state of a server-side copy into a blob, read with the storage account's key or the identity."""

    def __init__(self, settings: ArmSettings, clients: ArmClients):
        self.settings, self.clients = settings, clients

    async def __call__(self, wait: arm.Wait) -> arm.Progress:
        credential: Any = None
        if wait.state:  # the staging storage account: read with its key
            account = arm.ResourceId.parse(wait.state)
            keys = await self.clients.storage.storage_accounts.list_keys(account.resource_group, account.name)
            credential = keys.as_dict()["keys"][0]["value"]  # a key string: the account name from the URL
        elif "?" not in wait.id:  # no SAS in the URL: the build's identity
            credential = self.settings.credential(aio=True)
        blob = BlobClient.from_blob_url(wait.id, credential=credential, **self.settings.transport_options)
        try:
            copy = (await blob.get_blob_properties()).copy
        finally:
            await blob.close()
            if credential is not None and hasattr(credential, "close"):
                await credential.close()
        if copy.status == "success":
            return arm.Progress(True)
        if copy.status in ("failed", "aborted"):
            return arm.Progress(True, f"{wait.label}: blob copy {copy.status}: {copy.status_description}")
        return arm.Progress(False, note=f"copy {copy.status} {copy.progress or ''}")

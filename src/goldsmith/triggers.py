"""AIB's SourceImage trigger as an Airflow AssetWatcher: a new version of the source image starts a rebuild.

The trigger runs in the triggerer and polls the source's latest version. It fires once per new version (the
versions it announced are remembered on disk, so a restarted triggerer does not announce them again) and, like
AIB since 2024, stops firing after repeated failed builds until a build succeeds. It ignores versions that a
Goldsmith DAG published: that DAG's distribute task has emitted their asset event already, and a second event
would queue a second rebuild.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, AsyncIterator

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

from goldsmith import runoutputs

MAX_CONSECUTIVE_FAILURES = 3


def latest_source_version(source: dict[str, Any], home: Path) -> str:
    """The exact version `latest` resolves to now, by the local catalog or gallery."""
    return latest_source(source, home)[0]


def latest_source(source: dict[str, Any], home: Path) -> tuple[str, dict[str, Any]]:
    """The exact version `latest` resolves to now, and its provenance ({} for platform images)."""
    if source["type"] == "PlatformImage":
        from goldsmith.local import catalog

        return catalog.resolve(source["publisher"], source["offer"], source["sku"], "latest").exact_version, {}
    from goldsmith.local.gallery import LocalGallery

    gallery = LocalGallery(home / "gallery")
    if source["type"] == "ManagedImage":
        image = gallery.resolve_managed_image(source["imageId"])
        return "sha256:" + image.metadata["checksums"]["sha256"], image.metadata["provenance"]
    version = gallery.resolve_image_version(source["imageVersionId"])
    return version.version, version.metadata["provenance"]


def consecutive_failures(results: list[dict[str, Any]]) -> int:
    count = 0
    for result in reversed(results):
        if result["succeeded"]:
            break
        count += 1
    return count


class SourceVersionTrigger(BaseEventTrigger):
    def __init__(self, template: str, source: dict[str, Any], home: str, poll_seconds: float = 300):
        super().__init__()
        self.template = template
        self.source = source
        self.home = home
        self.poll_seconds = poll_seconds

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"template": self.template, "source": self.source, "home": self.home,
                 "poll_seconds": self.poll_seconds})

    @property
    def _announced_file(self) -> Path:
        return Path(self.home) / "runs" / self.template / ".source-trigger.json"

    def check(self) -> str | None:
        """The new version to announce now, if any (synchronous: runs in a worker thread)."""
        home = Path(self.home)
        latest, provenance = latest_source(self.source, home)
        if provenance.get("dagId"):
            return None  # a Goldsmith build published it, and its distribute task already emitted the asset event
        results = runoutputs.list_results(self.template, home=home)
        built = next((r["source"].get("exactVersion") for r in reversed(results) if r["succeeded"]), None)
        announced = json.loads(self._announced_file.read_text()).get("version") if self._announced_file.exists() else None
        if latest in (built, announced):
            return None
        failures = consecutive_failures(results)
        if failures >= MAX_CONSECUTIVE_FAILURES:
            self.log.warning("%s: source version %s is new, but the last %d builds failed: not triggering until a "
                             "build succeeds (trigger one by hand)", self.template, latest, failures)
            return None
        self._announced_file.parent.mkdir(parents=True, exist_ok=True)
        self._announced_file.write_text(json.dumps({"version": latest}))
        return latest

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while True:
            try:
                version = await asyncio.to_thread(self.check)
            except Exception as e:  # a source that can't be read now may be readable at the next poll
                self.log.warning("%s: can't read the source's versions: %s", self.template, e)
                version = None
            if version:
                self.log.info("%s: new source version %s", self.template, version)
                yield TriggerEvent({"template": self.template, "source": self.source, "exactVersion": version})
            await asyncio.sleep(self.poll_seconds)

"""AIB's SourceImage trigger as an Airflow AssetWatcher: a new version of the source image starts a rebuild.

The trigger runs in the triggerer and polls the source's latest version through the template's backend's
source resolver (the registry's SOURCES: the local catalog and gallery, or ARM for an azure-backend template).
It fires once per new version (the versions it announced are remembered on disk, so a restarted triggerer does
not announce them again) and, like AIB since 2024, stops firing after repeated failed builds until a build
succeeds. It ignores versions that a Goldsmith DAG published: that DAG's distribute task has emitted their
asset event already, and a second event would queue a second rebuild.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, AsyncIterator

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

from goldsmith import core, runoutputs, runpolicy

MAX_CONSECUTIVE_FAILURES = 3


class SourceVersionTrigger(BaseEventTrigger):
    def __init__(self, template: str, source: dict[str, Any], home: str, poll_seconds: float = 300,
                 backend: str = "local", conn_id: str | None = None, location: str | None = None):
        super().__init__()
        self.template = template
        self.source = source
        self.home = home
        self.poll_seconds = poll_seconds
        self.backend, self.conn_id, self.location = backend, conn_id, location

    @classmethod
    def for_template(cls, loaded: Any, home: Path) -> SourceVersionTrigger:
        t, o = loaded.template, loaded.options
        azure = o.backend == "azure"
        return cls(loaded.name, t.properties.source.model_dump(mode="json", exclude_none=True), str(home),
                   o.sourcePollSeconds, o.backend, o.azureConnectionId if azure else None, t.location if azure else None)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        where = {"backend": self.backend, "conn_id": self.conn_id, "location": self.location} if self.backend != "local" else {}
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"template": self.template, "source": self.source, "home": self.home,
                 "poll_seconds": self.poll_seconds, **where})

    @property
    def _announced_file(self) -> Path:
        return Path(self.home) / "runs" / self.template / ".source-trigger.json"

    def check(self) -> str | None:
        """The new version to announce now, if any (synchronous: runs in a worker thread)."""
        home = Path(self.home)
        resolver = core.sources_for(self.backend, home=home, conn_id=self.conn_id, location=self.location)
        latest, provenance = resolver.latest(self.source)
        if provenance and provenance.dagId:
            return None  # a Goldsmith build published it, and its distribute task already emitted the asset event
        results = runoutputs.list_results(self.template, home=home)
        built = next((r["source"].get("exactVersion") for r in reversed(results) if r["succeeded"]), None)
        announced = json.loads(self._announced_file.read_text()).get("version") if self._announced_file.exists() else None
        if latest is None or latest in (built, announced):
            return None
        failures = runpolicy.consecutive_failures(results)
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

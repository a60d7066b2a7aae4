"""Compositions of a Builder (where the VM runs) with Publishers (where the artifacts go).

"Build locally, publish to Azure" is the local Builder with the Azure blob Publisher: every build step is the
local backend's, `distribute` the publisher's, reading the captured image the builder hands it. Neither side
imports the other; only this module knows both (the registry names it: core.BACKENDS["local+azure"]).
"""

from __future__ import annotations

from typing import Any

from goldsmith.azure.publish import BlobPublisher
from goldsmith.core import Build
from goldsmith.local.backend import LocalBackend
from goldsmith.template.plan import Step


class Composed:
    def __init__(self, builder: Any, publisher: Any):
        self.builder, self.publisher = builder, publisher

    def __getattr__(self, name: str) -> Any:  # every build step but distribute is the builder's
        return getattr(self.builder, name)

    def distribute(self, step: Step, source: dict[str, Any]) -> dict[str, Any]:
        return self.publisher.distribute(step, source, self.builder)


def local_to_azure(build: Build) -> Composed:
    return Composed(LocalBackend(build), BlobPublisher(build))
